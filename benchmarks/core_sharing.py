"""How independent this machine's first two CPUs are right now.

A virtual machine's CPUs are threads of the host: two of them may run on two physical
cores, on the two hardware threads of one core, or take turns on one, and the host
may change that from one minute to the next. Then the same study takes longer while
another process (the tracking server) works on "the other" CPU. This probe times a
fixed loop pinned to CPU 0, alone and while a busy loop runs pinned to CPU 1:

- ~1.0: the two CPUs are independent;
- ~1.2-1.4: hardware threads of one core;
- ~2.0: they take turns on one core.

Usage:
    .venv/bin/python benchmarks/core_sharing.py [--samples 20] [--every 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

SPIN = [sys.executable, "-c", "while True: pass"]


def _loop(n: int = 400_000) -> float:
    started = time.perf_counter()
    total = 0
    for i in range(n):
        total += i
    return time.perf_counter() - started


def slowdown(repeats: int = 3) -> float | None:
    """The loop's time with CPU 1 busy over its time alone (median of ``repeats``);
    None on a machine with fewer than two CPUs for this process."""
    before = os.sched_getaffinity(0)
    cpus = sorted(before)
    if len(cpus) < 2:
        return None
    os.sched_setaffinity(0, {cpus[0]})
    try:
        ratios = []
        for _ in range(repeats):
            alone = _loop()
            spinner = subprocess.Popen(
                ["taskset", "-c", str(cpus[1]), *SPIN], stdout=subprocess.DEVNULL
            )
            try:
                time.sleep(0.05)  # until the spinner runs
                busy = _loop()
            finally:
                spinner.kill()
                spinner.wait()
            ratios.append(busy / alone)
        return round(statistics.median(ratios), 3)
    finally:
        os.sched_setaffinity(0, before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--every", type=float, default=3.0, help="seconds between samples")
    args = parser.parse_args(argv)
    samples = []
    for index in range(args.samples):
        samples.append(slowdown())
        print(f"  {time.strftime('%H:%M:%S')}  x{samples[-1]}", flush=True)
        if index + 1 < args.samples:
            time.sleep(args.every)
    if samples and samples[0] is not None:
        print(f"median x{statistics.median(samples):.2f}, range {min(samples)}-{max(samples)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
