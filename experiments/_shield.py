"""The Ctrl-C shield around tuning trials: where an interrupt may land, and where it waits.

Optuna records a trial interrupted inside its objective as FAIL, but an interrupt that
lands in its own bookkeeping (creating the trial, telling its result) or inside a write
to the study's storage leaves the trial RUNNING in the study for ever. So a worker routes
SIGINT/SIGTERM through :func:`interrupt_once` while trials run (:func:`deferred_interrupts`):
inside the objective (:func:`interruptible`) the interrupt is raised at once, except
during a storage call (:class:`ShieldedTrial`, :func:`uninterruptible`), which finishes
first; anywhere else it only asks the worker to stop before its next trial
(``STATE.requested``).

Python's ``signal`` module is the only tool here: no kept library defers an interrupt
to the end of a third party's database write, which is why this is hand-written.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading

import optuna

__all__ = [
    "STATE",
    "InterruptState",
    "ShieldedTrial",
    "deferred_interrupts",
    "ignoring_sigint",
    "interrupt_once",
    "interruptible",
    "uninterruptible",
]


class InterruptState:
    """Whether a stop was asked for, and whether an interrupt may be raised right now."""

    def __init__(self):
        self.requested = False
        self.inside_objective = False


# One per process: signal handlers are per process too. Read it as ``_shield.STATE``
# (a test replaces it with a fresh one).
STATE = InterruptState()


def interrupt_once(signum, frame):
    """The first SIGINT/SIGTERM stops the worker; later ones must not cut the cleanup."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    STATE.requested = True
    if STATE.inside_objective:
        raise KeyboardInterrupt


@contextlib.contextmanager
def interruptible():
    """The objective is where a Ctrl-C may interrupt at once."""
    STATE.inside_objective = True
    try:
        if STATE.requested:
            raise KeyboardInterrupt
        yield
    finally:
        STATE.inside_objective = False


@contextlib.contextmanager
def uninterruptible():
    """Inside the objective, a call that writes to the study's storage finishes first.

    An interrupt that lands inside a storage write can leave the database session in a
    state where Optuna can no longer tell the trial's result, and the trial stays
    RUNNING; so the interrupt waits for the write and is raised right after it.
    """
    STATE.inside_objective = False
    try:
        yield
    finally:
        STATE.inside_objective = True
    if STATE.requested:
        raise KeyboardInterrupt


class ShieldedTrial:
    """The trial as the objective sees it: each of its calls (suggest and report write
    to the storage, should_prune reads it) runs :func:`uninterruptible`."""

    def __init__(self, trial: optuna.Trial):
        self._trial = trial

    def __getattr__(self, name):
        value = getattr(self._trial, name)
        if not callable(value):
            return value

        @functools.wraps(value)
        def shielded(*args, **kwargs):
            with uninterruptible():
                return value(*args, **kwargs)

        return shielded


@contextlib.contextmanager
def deferred_interrupts():
    """Route SIGINT/SIGTERM through :func:`interrupt_once` while trials run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, interrupt_once) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def ignoring_sigint():
    """While cleaning up after Ctrl-C, a second Ctrl-C must not leave runs open."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
