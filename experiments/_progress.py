"""Tune's progress bar: trials finished, pruned, failed, best so far — a tqdm bar on stderr.

It reads the study from the storage, so it counts every worker's trials, not only the
calling process's: a thread polls the study and moves the bar.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from typing import TextIO

import optuna
from tqdm import tqdm

from experiments import _study

__all__ = ["TuneProgress"]

logger = logging.getLogger(__name__)

# In a log file (not a terminal) every redraw is a line: redraw seldom.
LOG_FILE_REFRESH_S = 10.0


class TuneProgress:
    """A tqdm bar of the study's trials since it started (``start``/``stop``)."""

    def __init__(
        self,
        storage_uri: str,
        study_name: str,
        metric: str,
        n_trials: int,
        interval: float = 0.5,
        file: TextIO | None = None,
    ):
        self.storage_uri, self.study_name, self.metric = storage_uri, study_name, metric
        self.n_trials, self.interval = n_trials, interval
        self.file = file if file is not None else sys.stderr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tune-progress", daemon=True)
        self.bar: tqdm | None = None

    def start(self) -> None:
        storage = _study.open_storage(self.storage_uri, heartbeat=False)
        self._study = optuna.load_study(study_name=self.study_name, storage=storage)
        self._baseline = self._finished_numbers()
        self._tty = tty = hasattr(self.file, "isatty") and self.file.isatty()
        self.bar = tqdm(
            total=self.n_trials,
            desc="tune",
            unit="trial",
            file=self.file,
            dynamic_ncols=tty,
            mininterval=0.1 if tty else LOG_FILE_REFRESH_S,
            leave=True,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.bar is not None:
            with contextlib.suppress(Exception):
                self.draw()
                self.bar.refresh()
            self.bar.close()

    def draw(self) -> None:
        """Move the bar to the study's state now (the polling thread calls this)."""
        trials = [
            t
            for t in self._study.get_trials(deepcopy=False)
            if t.state.is_finished() and t.number not in self._baseline
        ]
        states = optuna.trial.TrialState
        pruned = sum(t.state == states.PRUNED for t in trials)
        failed = sum(t.state == states.FAIL for t in trials)
        try:
            best = self._study.best_trial
            best_text = f"best {self.metric} {best.value:.4f} (trial {best.number})"
        except ValueError:
            best_text = "no trial complete yet"
        self.bar.set_postfix_str(f"{pruned} pruned · {failed} failed · {best_text}", refresh=False)
        self.bar.update(min(len(trials), self.n_trials) - self.bar.n)  # redraws per mininterval
        if self._tty:
            self.bar.refresh()  # the elapsed time moves on between trials too

    def _finished_numbers(self) -> set[int]:
        return {t.number for t in self._study.get_trials(deepcopy=False) if t.state.is_finished()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.draw()
            except Exception:  # a busy storage only delays the bar
                logger.debug("progress: the study could not be read", exc_info=True)
