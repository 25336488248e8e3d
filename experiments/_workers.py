"""Where trials run: worker processes on one study, each trial logged as a nested run.

Worker processes import only what a trial needs (no plotting of studies, no model
logging): a spawned interpreter's imports are most of a worker's start-up time.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import optuna
from threadpoolctl import threadpool_limits

from experiments import _shield, _study, data
from experiments._objective import CrossValidation, FoldScores
from experiments._progress import TuneProgress
from experiments._trial_runs import COMPLETE, FAIL, INTERRUPTED, PRUNED, TrialRuns
from stageflow import processes

logger = logging.getLogger(__name__)

# Optuna's own default: prune only once five trials have finished to compare with.
PRUNER_STARTUP_TRIALS = 5
WORKER_STOP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StudyJob:
    """Everything a worker process needs to run trials of the study (picklable)."""

    source: str
    target: str
    task: str
    metric: str
    families: tuple[str, ...]
    folds: int
    seed: int
    storage_uri: str
    study_name: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    threads: int = 1  # OpenMP threads per worker (trial_threads)
    optuna_verbosity: int = optuna.logging.WARNING
    plan: object = None  # the data check's decisions (experiments.data_check.Plan), replayed


def threads_per_worker(workers: int) -> int:
    """The OpenMP threads each of ``workers`` processes gets: the cores shared out."""
    return max(1, (os.cpu_count() or 1) // workers)


def trial_threads(threads: int):
    """The native thread pools trials run with: ``threads`` for OpenMP, one for BLAS.

    OpenMP is where these families' parallel work is (histogram gradient boosting's
    histograms, scikit-learn's loss and gradient loops). BLAS only sees the matrix-vector
    products of a linear model's solver, too small to split: a second OpenBLAS thread
    left ``lr`` trials as fast as one, on breast_cancer as on 200,000 x 50, while it
    busy-waits between calls and so doubled the study's CPU time, taking a core from the
    tracking server and the other workers (BENCHMARKS.md, "Tuning").
    """
    return threadpool_limits(limits={"openmp": threads, "blas": 1})


def prepare(source: str, target: str, task: str | None, seed: int, plan=None):
    """The data exactly as ``train`` prepares it: features, splits and task.

    ``plan`` is the data check's decisions (dropped columns, parsed dates), made once
    by the parent process and replayed here.
    """
    frame = data.load(source)
    if plan is not None:
        frame = plan.apply(frame)
    X, y, task = data.features_and_target(frame, target, task)
    X = data.prepare_features(X)
    return X, data.split(X, y, task, seed), task


class TrialBudget:
    """How many trials the workers of one invocation may still start, shared between processes.

    Both numbers are shared memory, so a pool started before the study is known can be
    given its budget later (:meth:`WorkerPool.run`).
    """

    def __init__(self, total: int = 0, context=None):
        context = context or multiprocessing.get_context("spawn")
        self.total = context.Value("i", total)
        self.claimed = context.Value("i", 0)

    def claim(self) -> bool:
        """Take one trial from the budget; False once it is spent."""
        with self.claimed.get_lock():
            if self.claimed.value >= self.total.value:
                return False
            self.claimed.value += 1
            return True


class WorkerPool:
    """Worker processes started ahead of their work, so their start-up overlaps the caller's setup.

    ``start="spawn"`` (the default) is safe in any caller: a fresh interpreter, at the
    price of a few seconds importing scikit-learn and MLflow, which is why
    :func:`experiments.tune.tune` starts the pool before it loads data and opens runs.
    ``start="fork"`` starts in milliseconds but is only safe in a process that has no
    other threads, no open database connections and has never run OpenMP code (a forked
    child of a process whose GNU OpenMP pool is up hangs in its first parallel region):
    the command line, which starts the pool before doing anything else, qualifies.
    Each worker waits for :meth:`run` to hand it the study, or for :meth:`close`.
    """

    def __init__(self, size: int, start: str = "spawn"):
        if start == "fork" and threading.active_count() > 1:
            start = "spawn"  # someone started a thread since the caller checked
        context = multiprocessing.get_context(start)
        self.budget = TrialBudget(0, context)
        self.procs, self._conns = [], []
        for index in range(1, size + 1):
            ours, theirs = context.Pipe()
            proc = context.Process(
                target=_worker_process,
                args=(theirs, index, self.budget),
                name=f"stageflow-tune-worker-{index}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self._conns.append(ours)

    def run(self, job: StudyJob, n_trials: int, timeout: float | None) -> None:
        """Give every worker the study; they claim trials until ``n_trials`` are taken."""
        self.budget.total.value = n_trials
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.send((job, timeout))

    def wait(self) -> None:
        for proc in self.procs:
            while proc.is_alive():
                proc.join(timeout=0.5)
        for proc in self.procs:
            if proc.exitcode:
                logger.warning(
                    "%s exited with code %s; the trials it finished are kept",
                    proc.name,
                    proc.exitcode,
                )

    def stop(self) -> None:
        """Interrupt every worker (each closes its current trial's run) and wait for it."""
        for proc in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for proc in self.procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning(
                    "%s did not stop within %.0fs; killing it", proc.name, WORKER_STOP_TIMEOUT_S
                )
                proc.kill()
                proc.join(timeout=5)

    def close(self) -> None:
        """Make sure no worker is left: after :meth:`wait` or :meth:`stop` all have exited;
        a worker that never got work (setup failed) is still importing or waiting: end it."""
        for conn in self._conns:
            conn.close()  # a waiting worker reads EOF and exits
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def run_workers(
    job: StudyJob,
    workers: int,
    n_trials: int,
    timeout: float | None,
    progress: bool = False,
    pool: WorkerPool | None = None,
) -> None:
    """Run ``n_trials`` trials of the study in ``workers`` processes (this one included).

    Workers claim trials one at a time from a shared budget, so together they run
    exactly ``n_trials`` and none idles while there is work: a worker that starts late
    or draws slow trials simply claims fewer. Ctrl-C (SIGINT to the process group, or
    to this process alone) stops all of them; each closes its current trial's run as
    KILLED before it exits.

    Args:
        pool: workers started earlier (``workers - 1`` of them); else started here.
    """
    own_pool = pool is None and workers > 1
    if own_pool:
        pool = WorkerPool(min(workers, n_trials) - 1)
    budget = pool.budget if pool else TrialBudget(n_trials)
    bar = TuneProgress(job.storage_uri, job.study_name, job.metric, n_trials) if progress else None
    try:
        if pool:
            pool.run(job, n_trials, timeout)
        if bar:
            bar.start()
        run_trials(job, 0, budget, timeout=timeout)
        if pool:
            pool.wait()
    except KeyboardInterrupt:
        if pool:
            with _shield.ignoring_sigint():
                pool.stop()
        raise
    finally:
        if bar:
            bar.stop()
        if own_pool:
            pool.close()


def run_trials(
    job: StudyJob,
    worker: int,
    budget: TrialBudget | int,
    timeout: float | None = None,
    log_trials: bool = True,
    background: bool = True,
) -> None:
    """One worker: trials of the study while ``budget`` lasts, each a child run of the parent.

    ``log_trials=False`` runs the same trials without MLflow, and ``background=False``
    makes each trial wait for its tracking calls: the benchmark's points of comparison.
    """
    optuna.logging.set_verbosity(job.optuna_verbosity)
    study = optuna.load_study(
        study_name=job.study_name,
        storage=_study.open_storage(job.storage_uri),
        sampler=sampler(job.seed + worker),
        pruner=pruner(),
    )
    _, splits, _ = prepare(job.source, job.target, job.task, job.seed, job.plan)
    objective = CrossValidation(
        splits.X_train, splits.y_train, job.task, job.metric, job.families, job.folds, job.seed
    )
    runs = (
        TrialRuns(
            job.tracking_uri,
            job.experiment_id,
            job.parent_run_id,
            job.study_name,
            job.metric,
            worker,
            background=background,
        )
        if log_trials
        else None
    )

    def traced(trial: optuna.Trial) -> float:
        scores, started = FoldScores(), time.perf_counter()
        # What finished() needs from started(): the trial's start time (ms).
        opened = runs.started(trial.number) if runs else None
        state, error = FAIL, ""
        try:
            with _shield.interruptible():
                value = objective(_shield.ShieldedTrial(trial), scores)
            state = COMPLETE
            return value
        except optuna.TrialPruned:
            state = PRUNED
            raise
        except KeyboardInterrupt:
            state = INTERRUPTED
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            if runs:
                elapsed = time.perf_counter() - started
                runs.finished(opened, trial.number, state, trial.params, scores, elapsed, error)

    if isinstance(budget, int):
        budget = TrialBudget(budget)
    deadline = time.monotonic() + timeout if timeout else None
    try:
        with warnings.catch_warnings(), _shield.deferred_interrupts(), trial_threads(job.threads):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            while (
                not _shield.STATE.requested
                and (deadline is None or time.monotonic() < deadline)
                and budget.claim()
            ):
                study.optimize(traced, n_trials=1, catch=(Exception,))
        if _shield.STATE.requested:
            raise KeyboardInterrupt
    finally:
        if runs:
            runs.close()


def sampler(seed: int) -> optuna.samplers.BaseSampler:
    """TPE over the joint, conditional space; each worker gets its own seed."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True)


def pruner() -> optuna.pruners.BasePruner:
    """Stop a trial whose running fold mean is worse than the median of earlier trials."""
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS, n_warmup_steps=0)


def _worker_process(conn, worker: int, budget: TrialBudget) -> None:
    """Entry point of a spawned worker: dies with its parent, stops cleanly on SIGINT/SIGTERM."""
    processes._die_with_parent()  # noqa: SLF001 - the same guarantee every child of ours has
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _shield.interrupt_once)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        try:
            work = conn.recv()
        except EOFError:
            return  # the parent went away before there was work
        if work is None:
            return
        job, timeout = work
        run_trials(job, worker, budget, timeout=timeout)
    except KeyboardInterrupt:
        sys.exit(130)
