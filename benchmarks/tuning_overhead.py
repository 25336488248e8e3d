"""Tuning: what MLflow tracking costs a study, and what a second worker buys.

One invocation starts Stageflow's tracking server on a free port in a temporary
folder, runs the measurements below, prints a table, writes the figures as JSON to
``benchmarks/results/`` (ignored by git) and stops the server, also on Ctrl-C.

- overhead: the same study (same seed, so the same trials: TPE is deterministic
  given the same history) of a fast model, run with and without MLflow logging, in
  alternating rounds so load from other programs falls on every variant alike:
    - ``off``: no MLflow at all (Optuna and SQLite only), the trials' native thread
      pools as ``stageflow tune --workers 1`` sets them (one BLAS thread, OpenMP on
      every core: ``experiments._workers.trial_threads``);
    - ``off-library-threads`` (not in the default list): the same, the thread pools
      left as the libraries set them (what a hand-written Optuna loop gets): what the
      thread policy does to the study the overhead is measured against;
    - ``stageflow``: what ``stageflow tune`` does: one run per trial, written when
      the trial ends in three tracking calls (create with every tag, one
      ``log_batch``, update with the status) made by a background thread as plain
      REST requests on one keep-alive session;
    - ``mlflow-client``: the same, the calls made through ``MlflowClient`` (not in
      the default list: what the lean client saves);
    - ``stageflow-library-threads`` (not in the default list): ``stageflow`` with the
      thread pools left as the libraries set them, as ``stageflow tune`` ran before it
      limited BLAS to one thread;
    - ``inline``: the same three calls, each trial waiting for them;
    - ``per-value``: one call per param and per metric, each trial waiting (what
      logging with ``mlflow.log_param``/``log_metric`` in the objective costs);
  Each variant's rounds are reported as wall seconds; as its per-round ratios to the
  ``off`` study of the same round (a pair shares the machine's state of that minute):
  their mean with a 95% bootstrap interval, and their median; and as CPU seconds, this
  process's (the study, its native threads, the logging thread) and the tracking
  server's. Plus where the time of a logged trial goes: the latency of each call.
- speed-up: ``stageflow tune --workers 1`` against ``--workers 2`` on one SQLite study
  of a heavier model (random forests), logging on.

Usage:
    .venv/bin/python benchmarks/tuning_overhead.py [--trials 40] [--rounds 8]
        [--variants off,stageflow,inline,per-value] [--speedup-trials 40]
        [--speedup-rounds 2] [--skip-speedup]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout, installed or not

import contextlib  # noqa: E402
import random  # noqa: E402

import optuna  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import RunStatus  # noqa: E402

from benchmarks import core_sharing  # noqa: E402
from benchmarks.tracking_latency import _group_cpu_s  # noqa: E402
from experiments import _study, _trial_runs, _workers  # noqa: E402
from stageflow import processes, server  # noqa: E402

RESULTS_DIR = REPO / "benchmarks" / "results"
DATA, TARGET = "builtin:breast_cancer", "target"
OVERHEAD_GOAL, SPEEDUP_GOAL = 1.15, 1.6
# core_sharing.slowdown() under this: the two CPUs behaved as independent cores.
INDEPENDENT_CPUS = 1.15
VARIANTS = ("off", "stageflow", "inline", "per-value")
EXTRA_VARIANTS = ("mlflow-client", "off-library-threads", "stageflow-library-threads")
UNLOGGED = ("off", "off-library-threads")
LIBRARY_THREADS = ("off-library-threads", "stageflow-library-threads")


class _PerValueRuns(_trial_runs.TrialRuns):
    """One tracking call per param and per metric, as a hand-written objective would make."""

    def __init__(self, tracking_uri, *args, **kwargs):
        super().__init__(tracking_uri, *args, **kwargs)
        self.client = MlflowClient(tracking_uri)

    def started(self, number):
        tags = self._tags(number, "RUNNING", "")
        run_name = _trial_runs.trial_run_name(number)
        return self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id

    def finished(self, run_id, number, state, params, scores, seconds, error=""):
        for key, value in params.items():
            self.client.log_param(run_id, key, value)
        for key, value in {**scores.summary(), "trial_seconds": seconds}.items():
            self.client.log_metric(run_id, key, value)
        self.client.set_tag(run_id, _trial_runs.STATE_TAG, state)
        self.client.set_terminated(run_id, _trial_runs.RUN_STATUS[state])


class _ClientRuns(_trial_runs.TrialRuns):
    """What ``stageflow tune`` does, the calls made through ``MlflowClient``."""

    def __init__(self, tracking_uri, *args, **kwargs):
        super().__init__(tracking_uri, *args, **kwargs)
        self.calls = _trial_runs._ClientCalls(tracking_uri)


class _Timed:
    """Wraps the tracking calls (or an MlflowClient) and records how long each call takes."""

    def __init__(self, client, timings):
        self._client, self._timings = client, timings

    def __getattr__(self, name):
        method = getattr(self._client, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._timings[name].append(time.perf_counter() - started)

        return timed


def _job(storage_dir: Path, tracking_uri: str, name: str, families, experiment_id, parent):
    return _workers.StudyJob(
        source=DATA,
        target=TARGET,
        task="classification",
        metric="accuracy",
        families=families,
        folds=3,
        seed=42,
        storage_uri=f"sqlite:///{storage_dir / f'{name}.db'}",
        study_name=name,
        tracking_uri=tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=parent,
        threads=_workers.threads_per_worker(1),  # what `stageflow tune --workers 1` uses
    )


def _new_study(job) -> None:
    optuna.create_study(
        study_name=job.study_name,
        storage=_study.open_storage(job.storage_uri),
        direction="maximize",
    )


def _summary(job) -> dict:
    return _summary_of(job.storage_uri, job.study_name)


def _summary_of(storage: str, name: str) -> dict:
    study = optuna.load_study(study_name=name, storage=storage)
    states = [t.state.name for t in study.trials]
    return {
        "complete": states.count("COMPLETE"),
        "pruned": states.count("PRUNED"),
        "best": round(study.best_value, 6),
        "trial_compute_s": round(
            sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials), 3
        ),
    }


def _library_threads(threads: int):
    """``*-library-threads``: leave the native thread pools as the libraries set them."""
    return contextlib.nullcontext()


def _mean_with_interval(values: list[float], resamples: int = 2000) -> list[float]:
    """The mean and a 95% percentile-bootstrap interval of it (seeded: reproducible)."""
    rng = random.Random(0)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return [statistics.fmean(values), means[int(0.025 * resamples)], means[int(0.975 * resamples)]]


def measure_overhead(
    client,
    tracking_uri,
    server_pgid: int,
    work: Path,
    n_trials: int,
    rounds: int,
    family="lr",
    variants=VARIANTS,
) -> dict:
    experiment_id = client.create_experiment(f"bench-overhead-{time.time_ns()}")
    seconds, load = defaultdict(list), defaultdict(list)
    cpu, server_cpu = defaultdict(list), defaultdict(list)
    paired, sharing = defaultdict(list), defaultdict(list)
    studies, call_ms = {}, defaultdict(list)
    original, original_threads = _trial_runs.TrialRuns, _workers.trial_threads
    for round_ in range(rounds):
        order = variants[round_ % len(variants) :] + variants[: round_ % len(variants)]
        for variant in order:
            parent = client.create_run(experiment_id, run_name=f"{variant}-{round_}").info.run_id
            name = f"{family}-{variant}-{round_}"
            job = _job(work, tracking_uri, name, (family,), experiment_id, parent)
            _new_study(job)
            runs_class = {"per-value": _PerValueRuns, "mlflow-client": _ClientRuns}.get(
                variant, original
            )
            if variant == "inline":
                runs_class = _timed_runs(call_ms)
            _workers.TrialRuns = runs_class  # the class run_trials instantiates
            if variant in LIBRARY_THREADS:
                _workers.trial_threads = _library_threads
            load[variant].append(round(os.getloadavg()[0], 2))
            sharing[variant].append(core_sharing.slowdown())
            try:
                started, cpu_started = time.perf_counter(), time.process_time()
                server_started = _group_cpu_s(server_pgid)
                _workers.run_trials(
                    job,
                    0,
                    n_trials,
                    log_trials=variant not in UNLOGGED,
                    background=variant in ("stageflow", "mlflow-client", *LIBRARY_THREADS),
                )
                # run_trials returns once every tracking call of the study has been answered.
                seconds[variant].append(time.perf_counter() - started)
                cpu[variant].append(time.process_time() - cpu_started)
                server_cpu[variant].append(_group_cpu_s(server_pgid) - server_started)
            finally:
                _workers.TrialRuns, _workers.trial_threads = original, original_threads
            client.set_terminated(parent, RunStatus.to_string(RunStatus.FINISHED))
            studies[variant] = _summary(job)
            print(
                f"  overhead round {round_ + 1}/{rounds} {variant:>25}: "
                f"{seconds[variant][-1]:.2f}s, CPU {cpu[variant][-1]:.2f}s here "
                f"+ {server_cpu[variant][-1]:.2f}s server (load {load[variant][-1]:.2f}, "
                f"core sharing x{sharing[variant][-1]})"
            )
        if "off" in variants:
            for variant in variants:
                paired[variant].append(seconds[variant][-1] / seconds["off"][-1])
    # The pairs whose two studies both started while the CPUs behaved as independent cores.
    independent = {
        v: [
            ratio
            for ratio, own, base in zip(r, sharing[v], sharing["off"], strict=True)
            if own is not None and base is not None and max(own, base) < INDEPENDENT_CPUS
        ]
        for v, r in paired.items()
    }
    median = {v: statistics.median(s) for v, s in seconds.items()}
    median_cpu = {v: statistics.median(s) for v, s in cpu.items()}
    return {
        "family": family,
        "n_trials": n_trials,
        "rounds": rounds,
        "seconds": {v: [round(x, 3) for x in s] for v, s in seconds.items()},
        "load_1min_at_start": dict(load),
        "median_s": {v: round(m, 3) for v, m in median.items()},
        "ratio_to_off": {v: round(m / median["off"], 3) for v, m in median.items()},
        # The fastest round of each variant: the least disturbed by other programs.
        "best_s": {v: round(min(s), 3) for v, s in seconds.items()},
        "best_ratio_to_off": {
            v: round(min(s) / min(seconds["off"]), 3) for v, s in seconds.items()
        },
        "per_trial_ms": {v: round(1000 * m / n_trials, 1) for v, m in median.items()},
        # Each round's ratio to the `off` study of the same round, then their median.
        "paired_ratios": {v: [round(x, 3) for x in r] for v, r in paired.items()},
        "median_paired_ratio": {v: round(statistics.median(r), 3) for v, r in paired.items()},
        "mean_paired_ratio_with_95pct_interval": {
            v: [round(x, 3) for x in _mean_with_interval(r)] for v, r in paired.items()
        },
        "core_sharing_at_start": dict(sharing),
        "independent_cpus_paired_ratios": {
            v: [round(x, 3) for x in r] for v, r in independent.items()
        },
        "cpu_s": {v: [round(x, 3) for x in s] for v, s in cpu.items()},
        "server_cpu_s": {v: [round(x, 3) for x in s] for v, s in server_cpu.items()},
        "cpu_per_trial_ms": {v: round(1000 * m / n_trials, 1) for v, m in median_cpu.items()},
        "server_cpu_per_trial_ms": {
            v: round(1000 * statistics.median(s) / n_trials, 1) for v, s in server_cpu.items()
        },
        "same_study": studies,
        "inline_call_ms": {
            name: {"calls": len(t), "median": round(1000 * statistics.median(t), 2)}
            for name, t in call_ms.items()
        },
    }


def _timed_runs(call_ms):
    class TimedRuns(_trial_runs.TrialRuns):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.calls = _Timed(self.calls, call_ms)

    return TimedRuns


def measure_speedup(client, tracking_uri, work: Path, n_trials: int, rounds: int) -> dict:
    """``stageflow tune --workers 1`` against ``--workers 2``, the command users run.

    The figure compared is the trials phase (the parent run's ``tune_seconds``): from the
    first trial to the last worker's exit; a worker that is not ready yet simply claims
    fewer trials. The whole command (interpreter start, setup, and the refit of the best
    trial: the same work for both) is reported beside it, and so is the speed-up in work
    done (summed trial seconds per second of the trials phase): each worker samples with
    its own seed, so two workers do not run the same trials as one.
    """
    phase, whole, studies = defaultdict(list), defaultdict(list), {}
    work_rate = defaultdict(list)
    for round_ in range(rounds):
        for workers in (1, 2) if round_ % 2 == 0 else (2, 1):
            name = f"speedup-w{workers}-{round_}"
            storage = f"sqlite:///{work / f'{name}.db'}"
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "stageflow", "tune", "--data", DATA, "--target", TARGET]
                + ["--model-name", name, "--n-trials", str(n_trials), "--workers", str(workers)]
                + ["--storage", storage, "--study-name", name, "--families", "rf", "--json"],
                capture_output=True,
                text=True,
                env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
                check=True,
            )
            whole[workers].append(time.perf_counter() - started)
            answer = json.loads(done.stdout)
            run = client.get_run(answer["parent_run_id"])
            phase[workers].append(run.data.metrics["tune_seconds"])
            trials = client.search_runs(
                [run.info.experiment_id],
                f"tags.mlflow.parentRunId = '{run.info.run_id}'",
                max_results=1000,
            )
            by_worker = defaultdict(int)
            for trial in trials:
                by_worker[trial.data.tags["stageflow.tune.worker"]] += 1
            studies[name] = {**_summary_of(storage, name), "trials_by_worker": dict(by_worker)}
            work_rate[workers].append(studies[name]["trial_compute_s"] / phase[workers][-1])
            print(
                f"  speed-up round {round_ + 1}/{rounds} {workers} worker(s): trials "
                f"{phase[workers][-1]:.2f}s, whole call {whole[workers][-1]:.2f}s"
            )
    median = {w: statistics.median(s) for w, s in phase.items()}
    median_whole = {w: statistics.median(s) for w, s in whole.items()}
    median_rate = {w: statistics.median(s) for w, s in work_rate.items()}
    return {
        "n_trials": n_trials,
        "rounds": rounds,
        "seconds": {str(w): [round(x, 3) for x in s] for w, s in phase.items()},
        "median_s": {str(w): round(m, 3) for w, m in median.items()},
        "speedup": round(median[1] / median[2], 3),
        "whole_call_seconds": {str(w): [round(x, 3) for x in s] for w, s in whole.items()},
        "whole_call_speedup": round(median_whole[1] / median_whole[2], 3),
        "work_per_second": {str(w): [round(x, 3) for x in s] for w, s in work_rate.items()},
        "work_normalised_speedup": round(median_rate[2] / median_rate[1], 3),
        "studies": studies,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=40, help="trials per overhead study")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of the overhead variants")
    parser.add_argument("--speedup-trials", type=int, default=40)
    parser.add_argument("--speedup-rounds", type=int, default=2)
    parser.add_argument("--family", default="lr", help="model family of the overhead study")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"overhead variants ({','.join(VARIANTS + EXTRA_VARIANTS)})",
    )
    parser.add_argument("--skip-speedup", action="store_true")
    args = parser.parse_args(argv)

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    machine = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "optuna": optuna.__version__,
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }
    meta = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "argv": sys.argv[1:]}
    with tempfile.TemporaryDirectory(prefix="stageflow-bench-tuning-") as tmp:
        home, work = Path(tmp) / "home", Path(tmp) / "studies"
        work.mkdir()
        info = server.start(port=processes.free_port(), home=home, tie_to_parent=True)
        try:
            os.environ["MLFLOW_TRACKING_URI"] = info.uri
            client = MlflowClient(info.uri)
            print(f"tracking server {info.uri}; overhead: {args.trials} trials x {args.rounds}")
            variants = tuple(v for v in args.variants.split(",") if v)
            overhead = measure_overhead(
                client, info.uri, info.pid, work, args.trials, args.rounds, args.family, variants
            )
            speedup = None
            if not args.skip_speedup:
                print(f"speed-up: {args.speedup_trials} trials x {args.speedup_rounds}")
                speedup = measure_speedup(
                    client, info.uri, work, args.speedup_trials, args.speedup_rounds
                )
        finally:
            server.stop(home)
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]

    print(f"\ntracking overhead (same study of {args.family}, medians of {args.rounds} rounds):")
    print(
        f"  {'variant':>25}  {'wall':>6}  {'ms/trial':>8}  {'x off':>6}  "
        f"{'paired: mean [95% interval]':>28}  {'median':>6}  {'best':>6}  "
        f"{'CPU ms/trial: here':>18}  {'server':>6}"
    )
    nan3 = [float("nan")] * 3
    for variant in variants:
        mean, low, high = overhead["mean_paired_ratio_with_95pct_interval"].get(variant, nan3)
        print(
            f"  {variant:>25}: {overhead['median_s'][variant]:5.2f}s  "
            f"{overhead['per_trial_ms'][variant]:8.1f}  "
            f"{overhead['ratio_to_off'][variant]:6.3f}  "
            f"{mean:12.3f} [{low:.3f}, {high:.3f}]  "
            f"{overhead['median_paired_ratio'].get(variant, float('nan')):6.3f}  "
            f"{overhead['best_ratio_to_off'][variant]:6.3f}  "
            f"{overhead['cpu_per_trial_ms'][variant]:18.1f}  "
            f"{overhead['server_cpu_per_trial_ms'][variant]:6.1f}"
        )
    if "stageflow" in overhead["mean_paired_ratio_with_95pct_interval"]:
        mean, low, high = overhead["mean_paired_ratio_with_95pct_interval"]["stageflow"]
        verdict = "met" if mean <= OVERHEAD_GOAL else "not met"
        print(
            f"  goal: stageflow <= x{OVERHEAD_GOAL} (mean paired ratio): {verdict} "
            f"(x{mean:.3f}, 95% interval {low:.3f}-{high:.3f})"
        )
        calm = overhead["independent_cpus_paired_ratios"]["stageflow"]
        if calm:
            print(
                f"  pairs started while the CPUs were independent (core sharing < "
                f"x{INDEPENDENT_CPUS}): {len(calm)} of {args.rounds}, "
                f"mean x{statistics.fmean(calm):.3f}"
            )
    print(f"  inline call latency (ms, median): {overhead['inline_call_ms']}")
    if speedup:
        print(
            f"\nparallel (trials phase): 1 worker {speedup['median_s']['1']:.2f}s, 2 workers "
            f"{speedup['median_s']['2']:.2f}s: x{speedup['speedup']:.2f} (goal >= {SPEEDUP_GOAL}); "
            f"whole call x{speedup['whole_call_speedup']:.2f}; in work done "
            f"x{speedup['work_normalised_speedup']:.2f}"
        )
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"tuning-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    path.write_text(
        json.dumps({**meta, "machine": machine, "overhead": overhead, "speedup": speedup}, indent=1)
    )
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
