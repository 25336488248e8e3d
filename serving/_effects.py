"""The effects: carry out the planner's actions on the slots, the processes and the front door.

``serving._planner`` decides; this module does, and keeps what the doing
changes: which slot serves, which is the rollback standby, which is the warm
Staging version, and which versions wait out a failed start. Every action
names the slot and version it is about; one whose slot no longer holds that
version by the time it is carried out (the world moved during a switch) is
skipped, and the next poll plans afresh.

The switch itself (``Switch``):

1. route the new slot, and wait until the front door has probed its replicas healthy;
2. unroute the old slot, and wait until the front door has probed them unhealthy;
3. keep the old version running, unrouted, as the rollback standby (requests
   already sent to it finish there);
4. the standby it replaces is stopped by a later plan (``Stop``), once that
   has been unrouted for at least ``SwitchPolicy.drain``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from registry import STAGING
from serving import _model_server
from serving._planner import (
    Action,
    ForgetWarm,
    GiveUp,
    MarkWarm,
    ReplaceReplica,
    RestartReplica,
    RetryReplicaLater,
    Start,
    StartSibling,
    Stop,
    Switch,
    SwitchPolicy,
    WaitForSlot,
)
from serving._slots import Slot
from serving._supervisor import LOG_TAIL_LINES, Supervisor, indent
from serving.frontdoor import FrontDoorTimings
from stageflow import processes

# The controller's account of its work is one log stream (see serving._supervisor).
logger = logging.getLogger("serving.controller")


class Effects:
    """What serves, what stands by, what is warm; and the doing that changes them.

    Args:
        model_name: the registered model served.
        url: the front door's address, for log lines.
        slots: the controller's slots (plans name them by index).
        supervisor: starts, restarts and stops single replicas.
        policy: how long to wait for the front door's probes.
        timings: the front door's, for the pause after routing a slot.
        local_copy: a version → its verified local copy (``stageflow.manifest``), what
            its replicas serve; raises, naming the file, for a version whose files changed.
    """

    def __init__(
        self,
        model_name: str,
        url: str,
        slots: list[Slot],
        supervisor: Supervisor,
        policy: SwitchPolicy,
        timings: FrontDoorTimings,
        local_copy: Callable[[str], Path],
    ):
        self.model_name = model_name
        self.url = url
        self.slots = slots
        self.supervisor = supervisor
        self.policy = policy
        self.timings = timings
        self.local_copy = local_copy
        self.active: Slot | None = None
        # The previous Production, kept running but unrouted: a rollback to it is a
        # front-door switch, not a cold start (DESIGN.md, "Serving semantics").
        self.standby: Slot | None = None
        # The Staging version, proved and unrouted: its promotion is a switch too.
        self.warm: Slot | None = None
        # Versions that failed to start: when each is due again, and how often it failed.
        self.retry_at: dict[str, float] = {}
        self.failed_starts: dict[str, int] = {}
        self._said_no_free_slot = False

    def index(self, slot: Slot | None) -> int | None:
        """``slot``'s place in :attr:`slots` (how plans name it), or None."""
        return None if slot is None else self.slots.index(slot)

    def carry_out(self, action: Action, stop: threading.Event) -> None:
        """Do ``action``; ``stop`` cuts short the waits of a switch when serving ends."""
        match action:
            case GiveUp():
                self._give_up(action)
            case RestartReplica():
                slot = self.slots[action.slot]
                if slot.version is not None:
                    self.supervisor.restart(
                        slot, slot.replicas[action.replica], action.exited, slot is self.active
                    )
            case StartSibling():
                slot = self.slots[action.slot]
                if slot.version is not None:
                    replica = slot.replicas[action.replica]
                    logger.info(
                        "version %s proved itself; starting its replica on %s",
                        slot.version,
                        replica.address,
                    )
                    self.supervisor.restart(
                        slot, replica, exited=False, serving=slot is self.active
                    )
            case ReplaceReplica():
                slot = self.slots[action.slot]
                if slot.version is not None:
                    replica = slot.replicas[action.replica]
                    self.supervisor.replace(
                        slot, replica, action.silent_for, serving=slot is self.active
                    )
            case RetryReplicaLater():
                slot = self.slots[action.slot]
                if slot.version is not None:
                    replica = slot.replicas[action.replica]
                    self.supervisor.retry_later(slot, replica, action.error, action.retry_at)
            case Stop():
                self._stop(action)
            case Start():
                self._start(action)
            case WaitForSlot():
                if not self._said_no_free_slot:
                    self._said_no_free_slot = True
                    logger.info(
                        "waiting for a slot to free up to start version %s (%s) in",
                        action.version,
                        action.role,
                    )
            case Switch():
                self._switch(action, stop)
            case MarkWarm():
                self._mark_warm(action)
            case ForgetWarm():
                if self.warm is self.slots[action.slot]:
                    self.warm = None
            case _:
                raise TypeError(f"unknown action {action!r}")

    def _holds(self, index: int, version: str, action: Action) -> Slot | None:
        slot = self.slots[index]
        if slot.version == version:
            return slot
        logger.debug("skipped %s: the slot holds version %s now", action, slot.version)
        return None

    # -- starting and giving up ------------------------------------------------------

    def _start(self, action: Start) -> None:
        """Start the version's first replica on its slot; the polls that follow prove it.

        Its siblings start once it has proved itself (the planner's ``StartSibling``):
        started together, each start shares the cores with the others and with the
        version serving, and the first answer of a cold version came twice as late.
        """
        slot, version, role = self.slots[action.slot], action.version, action.role
        if not slot.is_free():
            logger.debug("skipped %s: the slot is taken", action)
            return
        self._said_no_free_slot = False
        old = self.active.version if self.active is not None else None
        if self.failed_starts.get(version):
            logger.info("retrying version %s (%s) on %s", version, role, slot.where)
        elif role == STAGING:
            logger.info(
                "Staging of %s is version %s: starting it on %s ahead of its promotion",
                self.model_name,
                version,
                slot.where,
            )
        elif old is None:
            logger.info(
                "Production of %s is version %s: starting it on %s",
                self.model_name,
                version,
                slot.where,
            )
        else:
            logger.info(
                "Production changed %s → %s: starting version %s on %s",
                old,
                version,
                version,
                slot.where,
            )
        slot.version, slot.role, slot.started_at = version, role, time.monotonic()
        try:
            slot.model_dir = self.local_copy(version)
            slot.example = _model_server.serving_example(slot.model_dir)
            self.supervisor.start(slot, slot.replicas[0])
        except Exception as exc:  # noqa: BLE001 - e.g. the registry could not give the model: the plan retries
            slot.failure = f"{type(exc).__name__}: {exc}"
            return
        if slot.example is None:
            logger.warning(
                "version %s was logged without an input example; proving it on /ping alone",
                version,
            )

    def _give_up(self, action: GiveUp) -> None:
        """A starting version failed: stop it, never routed, and note when it is due again."""
        slot = self._holds(action.slot, action.version, action)
        if slot is None:
            return
        version, role, where, log_path = action.version, slot.role, slot.where, slot.failure_log
        ending = processes.tail(log_path, lines=LOG_TAIL_LINES)
        _model_server.stop(slot)
        self.retry_at[version] = action.retry_at
        attempts = self.failed_starts[version] = self.failed_starts.get(version, 0) + 1
        active = self.active
        still = (
            f"still serving version {active.version}"
            if active is not None and active.serving()
            else "nothing is served"
        )
        retry_in = self.policy.retry_after
        if attempts == 1:
            logger.error(
                "version %s of %s (%s) failed to start on %s: %s; %s; retrying in %.0fs. "
                "Its log: %s, ending:\n%s",
                version,
                self.model_name,
                role,
                where,
                action.error,
                still,
                retry_in,
                log_path,
                indent(ending),
            )
        else:
            logger.error(
                "version %s of %s (%s) failed to start again (attempt %d): %s; %s; retrying in "
                "%.0fs. Its log: %s",
                version,
                self.model_name,
                role,
                attempts,
                action.error,
                still,
                retry_in,
                log_path,
            )

    # -- warm versions and stopping ----------------------------------------------------

    def _mark_warm(self, action: MarkWarm) -> None:
        slot = self._holds(action.slot, action.version, action)
        if slot is None or self.warm is slot:
            return
        self.warm = slot
        if slot is self.standby:
            logger.info(
                "version %s (Staging) is the rollback standby, already warm on %s",
                action.version,
                slot.where,
            )
        else:
            logger.info(
                "version %s (Staging) is warm on %s for a promotion (ready in %.1fs)",
                action.version,
                slot.where,
                time.monotonic() - slot.started_at,
            )

    def _stop(self, action: Stop) -> None:
        slot = self._holds(action.slot, action.version, action)
        if slot is None:
            return
        where = slot.where
        if slot is self.warm:
            self.warm = None
        if slot is self.standby:
            self.standby = None
        _model_server.stop(slot)
        logger.info("stopped version %s on %s (%s)", action.version, where, action.why)

    # -- switching -----------------------------------------------------------------------

    def _switch(self, action: Switch, stop: threading.Event) -> None:
        slot = self._holds(action.slot, action.version, action)
        if slot is None:
            return
        old = self.active
        version = action.version
        if slot is self.standby:
            how = f"warm on {slot.where} as the rollback standby"
        elif slot is self.warm:
            how = f"warm on {slot.where} since it was in Staging"
        else:
            how = f"ready on {slot.where} (started in {time.monotonic() - slot.started_at:.1f}s)"
        if old is None:
            logger.info("version %s of %s is %s; routing it", version, self.model_name, how)
        else:
            logger.info(
                "Production of %s changed %s → %s: version %s is %s; switching",
                self.model_name,
                old.version,
                version,
                version,
                how,
            )
        began = time.monotonic()

        # 1. Route the new slot; both versions may now take traffic, and both are good.
        slot.routed = True
        if slot.wait_seen(healthy=True, timeout=self.policy.probe_wait):
            # Let Caddy record that probe before the old replicas start answering 503.
            stop.wait(self.timings.try_interval)
        else:
            logger.warning("the front door has not probed all of %s yet", slot.where)
        # 2. Unroute the old one; from the next probe on, everything goes to the new slot.
        if old is not None:
            old.routed = False
            old.unrouted_at = time.monotonic()
            old.wait_seen(healthy=False, timeout=self.policy.probe_wait)
        self.active = slot
        if self.standby is slot:
            self.standby = None
        if self.warm is slot:
            self.warm = None
        self.retry_at.pop(version, None)
        self.failed_starts.pop(version, None)
        took = time.monotonic() - began
        if old is None:
            logger.info(
                "serving %s version %s on %s from %d replica(s)",
                self.model_name,
                version,
                self.url,
                len(slot.replicas),
            )
            return
        logger.info(
            "switched %s to version %s in %.1fs; version %s on %s no longer takes new requests",
            self.model_name,
            version,
            took,
            old.version,
            old.where,
        )
        # 3. The old version stays warm, unrouted, as the rollback standby; requests
        # already sent to it finish there. 4. The standby it replaces is stopped by a
        # later plan (after the drain, if it was only just unrouted).
        if old.alive():
            self.standby = old
            logger.info("version %s stays warm on %s for a rollback", old.version, old.where)
        else:  # every replica of it had died: nothing to keep warm
            old_version, where = old.version, old.where
            _model_server.stop(old)
            logger.info("stopped version %s on %s (its replicas had exited)", old_version, where)

    def stop_all(self) -> None:
        """Stop every live version (the front door has stopped first)."""
        for slot in self.slots:
            if slot.version is not None:
                _model_server.stop(slot)
        self.active = self.standby = self.warm = None
