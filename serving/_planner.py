"""What serving should do next: what the controller observed, and a clock → a list of actions.

Pure: no I/O, no threads, no sleeps, no clock of its own. The controller
observes the registry (Production and Staging, or unreachable) and its slots
(which version each holds and why, whether it proved itself, failed, is
routed; each replica's state), hands that to :func:`plan` with the time, and
carries out the actions it gets back (``serving._effects``,
``serving._supervisor``). Every rule of DESIGN.md's "Serving semantics" that
decides *what* to do lives here, so each is tested in milliseconds
(``tests/serving/test_planner.py``); *how* an action is done lives with the effects.

The rules, in the order :func:`plan` applies them on each poll:

1. **Replicas** (even while the registry is away): a starting version whose
   replica failed its proof is given up (stopped, never routed) and retried
   after ``SwitchPolicy.retry_after``; a version's first replica starts alone (on
   two busy cores, starting them all at once doubled the time to the first answer)
   and its siblings start once it proved itself; in a proved version, a replica that died
   is restarted, one that runs but has not answered a liveness ping for
   ``SwitchPolicy.replace_after`` (hung) is killed and replaced, and one whose
   restart failed its proof is stopped and restarted again after ``retry_after``.
2. **Registry unreachable**: nothing else changes; the last known Production serves.
3. **Stop what is unneeded**: a live version that is neither served, the
   rollback standby, Production nor Staging, on two polls in a row (the
   registry is read in two calls; a read that raced a promotion must not stop
   the warm server the promotion is about to switch to), and not before
   ``SwitchPolicy.drain`` after it was unrouted. Stopping first frees slots
   for what the registry asks to start.
4. **Production**: while it is split (``RegistryState.split``: its stage, its
   alias and the ledger disagree -- an alias moved outside Stageflow, a fault
   between a move's writes), nothing follows it: the version serving keeps
   serving, nothing new starts or switches, and the one the registry names stays
   live but unrouted. Otherwise, unless it serves already or is waiting out a retry, a
   version that is not live starts (on the lowest free slot; with none free it
   waits), and a live one that proved itself (one replica is enough) is
   switched to. The version it replaces stays warm as the rollback standby.
5. **Staging**: unless it is Production or served, or waiting out a retry, it
   starts, and once proved it is marked warm for its promotion (the rollback
   standby is proved already: it is warm at once). When Staging moves on, the old warm version is no
   longer warm (rule 3 stops it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from registry import PRODUCTION, STAGING


@dataclass(frozen=True)
class SwitchPolicy:
    """How the controller paces itself.

    Attributes:
        probe_wait: longest wait for the front door to probe a slot's replicas
            after their answer changed (a few health intervals).
        drain: time left for requests already sent to an unrouted slot before it stops.
        retry_after: after a version (or a replica's restart) failed to start,
            wait this long before trying again.
        replace_after: a proved replica whose process runs but that has answered no
            liveness ping for this long is hung: it is killed and a fresh one started.
            Longer than the front door's ``first_byte_timeout`` plus the second or so
            it takes to leave the rotation, so every request sent to it has timed out
            (and been sent elsewhere) before the kill; killing it sooner would fail
            them instead.
    """

    probe_wait: float = 5.0
    drain: float = 1.0
    retry_after: float = 30.0
    replace_after: float = 5.0


# -- what the controller observed ---------------------------------------------


@dataclass(frozen=True)
class ReplicaState:
    """One replica as observed.

    Attributes:
        running: it has a process (alive or exited); False when stopped, waiting
            out a failed restart, or not started yet (a sibling of the first replica).
        alive: its process runs.
        ready: it proved itself (``/ping`` and the input example) since it last started.
        failure: why its proof failed on this poll, if it did.
        retry_at: after a failed restart, the next one is due then.
        silent_for: seconds since a proved replica last answered a liveness ping, while
            it keeps missing them (0 while it answers).
    """

    running: bool = True
    alive: bool = True
    ready: bool = True
    failure: str | None = None
    retry_at: float = 0.0
    silent_for: float = 0.0


@dataclass(frozen=True)
class SlotState:
    """One slot as observed: the version it holds, and how that version is doing.

    Attributes:
        version: the version it holds; None when free.
        role: why it was started (``Production`` or ``Staging``).
        proved: a replica proved itself: the version may be routed, and from
            then on a failing replica is restarted rather than the version given up.
        failure: why starting the version failed (on this poll), if it did.
        routed: the front door sends it requests.
        unrouted_at: when it was last unrouted (0: never routed).
        replicas: its replicas' states.
    """

    version: str | None = None
    role: str = ""
    proved: bool = False
    failure: str | None = None
    routed: bool = False
    unrouted_at: float = 0.0
    replicas: tuple[ReplicaState, ...] = ()

    @property
    def free(self) -> bool:
        return self.version is None and not any(r.running for r in self.replicas)

    @property
    def alive(self) -> bool:
        return any(r.alive for r in self.replicas)

    @property
    def answering(self) -> bool:
        """Some replica proved itself and still runs."""
        return any(r.ready and r.alive for r in self.replicas)


@dataclass(frozen=True)
class RegistryState:
    """The registry's Production and Staging versions (None: the stage holds none).

    ``split``: why Production is not settled (``registry._stages.Placement.split``);
    ``production`` is then the version the registry names, which serving does not follow.
    """

    production: str | None
    staging: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class State:
    """Everything :func:`plan` decides on.

    Attributes:
        now: the controller's clock (``time.monotonic()``).
        registry: what the registry holds; None when the tracking server did not answer.
        slots: every slot, in order (a version starts on the lowest free one).
        serving: the slot routed as Production, if any.
        standby: the slot of the previous Production, kept warm for a rollback.
        warm: the slot of the Staging version, proved and unrouted for its promotion.
        unneeded: the slots the previous plan found unneeded (slot → version).
        retry_at: versions that failed to start, and when they are due to be retried.
    """

    now: float
    registry: RegistryState | None
    slots: tuple[SlotState, ...]
    serving: int | None = None
    standby: int | None = None
    warm: int | None = None
    unneeded: Mapping[int, str] = field(default_factory=dict)
    retry_at: Mapping[str, float] = field(default_factory=dict)


# -- what to do about it --------------------------------------------------------


@dataclass(frozen=True)
class GiveUp:
    """A starting version failed: stop it (it was never routed) and retry it at ``retry_at``."""

    slot: int
    version: str
    error: str
    retry_at: float


@dataclass(frozen=True)
class RestartReplica:
    """Start a replica of a proved version again; ``exited``: it had proved itself, then died."""

    slot: int
    replica: int
    exited: bool


@dataclass(frozen=True)
class StartSibling:
    """The version's first replica proved itself: start ``replica``, which has not started yet."""

    slot: int
    replica: int


@dataclass(frozen=True)
class ReplaceReplica:
    """A proved replica runs but stopped answering: kill its process group, start a fresh one."""

    slot: int
    replica: int
    silent_for: float


@dataclass(frozen=True)
class RetryReplicaLater:
    """A restarted replica failed its proof: stop it, and restart it at ``retry_at``."""

    slot: int
    replica: int
    error: str
    retry_at: float


@dataclass(frozen=True)
class Stop:
    """Stop a version that is no longer needed (``why`` says so in the log)."""

    slot: int
    version: str
    why: str


@dataclass(frozen=True)
class Start:
    """Start ``version``'s first replica on a free slot, as ``role``; later polls prove it,
    and its siblings start once it has (:class:`StartSibling`)."""

    slot: int
    version: str
    role: str


@dataclass(frozen=True)
class WaitForSlot:
    """``version`` should start as ``role`` but every slot is taken; a later poll will."""

    version: str
    role: str


@dataclass(frozen=True)
class Switch:
    """Route ``slot`` as Production and unroute the one serving, which becomes the standby."""

    slot: int
    version: str


@dataclass(frozen=True)
class MarkWarm:
    """The Staging version is proved (or is the rollback standby): its promotion is a switch."""

    slot: int
    version: str


@dataclass(frozen=True)
class ForgetWarm:
    """Staging moved on: the warm version is no longer warm for a promotion."""

    slot: int


Action = (
    GiveUp
    | StartSibling
    | RestartReplica
    | ReplaceReplica
    | RetryReplicaLater
    | Stop
    | Start
    | WaitForSlot
    | Switch
    | MarkWarm
    | ForgetWarm
)


@dataclass(frozen=True)
class Plan:
    """The actions to carry out in order, and what to remember for the next plan.

    Attributes:
        actions: in order; empty when nothing is to be done.
        unneeded: hand to the next :class:`State` as ``unneeded``.
    """

    actions: tuple[Action, ...]
    unneeded: Mapping[int, str]


def plan(state: State, policy: SwitchPolicy = SwitchPolicy()) -> Plan:
    """Decide what to do next about ``state``.

    Later rules see what earlier ones decided in the same plan: a slot stopped
    is free for a start, a version switched to is the one serving.

    Example:
        >>> idle = SlotState()
        >>> plan(State(now=0.0, registry=RegistryState("1"), slots=(idle, idle))).actions
        (Start(slot=0, version='1', role='Production'),)
    """
    return _Planner(state, policy).run()


class _Planner:
    """One plan: the state as the actions decided so far leave it."""

    def __init__(self, state: State, policy: SwitchPolicy):
        self.state, self.policy, self.now = state, policy, state.now
        self.actions: list[Action] = []
        self.live = {i: slot for i, slot in enumerate(state.slots) if slot.version is not None}
        self.free = [i for i, slot in enumerate(state.slots) if slot.free]
        self.serving, self.standby, self.warm = state.serving, state.standby, state.warm
        self.retry_at = dict(state.retry_at)

    def run(self) -> Plan:
        self._tend_replicas()
        if self.state.registry is None:  # the registry is away: keep what runs as it is
            return Plan(tuple(self.actions), dict(self.state.unneeded))
        production, staging = self.state.registry.production, self.state.registry.staging
        unneeded = self._stop_unneeded(production, staging)
        if production is not None and self.state.registry.split is None:
            self._follow_production(production)
        self._follow_staging(staging, production)
        return Plan(tuple(self.actions), unneeded)

    # -- rule 1: replicas -----------------------------------------------------------

    def _tend_replicas(self) -> None:
        """Give up failed starts, start the siblings of a proved first replica, restart dead
        replicas, replace hung ones, back off restarts."""
        for i, slot in list(self.live.items()):
            if not slot.proved:
                if slot.failure is not None:
                    retry_at = self.now + self.policy.retry_after
                    self._do(GiveUp(i, str(slot.version), slot.failure, retry_at))
                    self.retry_at[str(slot.version)] = retry_at
                    self._free(i)
                continue  # still starting: the supervisor proves it a step per poll
            replicas = list(slot.replicas)
            for j, replica in enumerate(slot.replicas):
                if replica.ready and replica.alive:
                    if replica.silent_for >= self.policy.replace_after:  # hung
                        self._do(ReplaceReplica(i, j, replica.silent_for))
                        replicas[j] = ReplicaState(ready=False)
                    continue
                if replica.ready:  # it had proved itself, and died since
                    self._do(RestartReplica(i, j, exited=True))
                    replicas[j] = ReplicaState(ready=False)
                elif not replica.running and not replica.retry_at:  # not started yet
                    self._do(StartSibling(i, j))
                    replicas[j] = ReplicaState(ready=False)
                elif not replica.running:  # its last restart failed: again when due
                    if self.now >= replica.retry_at:
                        self._do(RestartReplica(i, j, exited=False))
                        replicas[j] = ReplicaState(ready=False)
                elif replica.failure is not None:
                    retry_at = self.now + self.policy.retry_after
                    self._do(RetryReplicaLater(i, j, replica.failure, retry_at))
                    replicas[j] = ReplicaState(
                        running=False, alive=False, ready=False, retry_at=retry_at
                    )
                # else restarting: the supervisor proves it a step per poll
            self.live[i] = dataclasses.replace(slot, replicas=tuple(replicas))

    # -- rule 3: stop what is unneeded -------------------------------------------

    def _stop_unneeded(self, production: str | None, staging: str | None) -> dict[int, str]:
        needed = {self.serving, self.standby, self._slot_of(production), self._slot_of(staging)}
        unneeded = {i: str(s.version) for i, s in self.live.items() if i not in needed}
        remembered = dict(unneeded)
        for i, version in unneeded.items():
            if self.state.unneeded.get(i) != version:
                continue  # unneeded on this read only: wait for the next one to agree
            slot = self.live[i]
            if slot.alive and self.now - slot.unrouted_at < self.policy.drain:
                continue  # requests sent to it before it was unrouted finish first
            if slot.unrouted_at:
                why = "no longer the rollback standby"
            elif slot.role == STAGING:
                why = f"Staging is now version {staging}" if staging else "no longer in Staging"
            else:
                why = "no longer Production"
            self._do(Stop(i, version, why))
            if self.warm == i:
                self.warm = None
            del remembered[i]
            self._free(i)
        return remembered

    # -- rule 4: Production ---------------------------------------------------------

    def _follow_production(self, version: str) -> None:
        if self._version_of(self.serving) == version:
            return
        if self.now < self.retry_at.get(version, 0.0):
            return
        i = self._slot_of(version)
        if i is None:
            self._start(version, PRODUCTION)
        elif self.live[i].proved and self.live[i].answering:
            self._switch(i, version)

    def _switch(self, i: int, version: str) -> None:
        self._do(Switch(i, version))
        old = self.serving
        self.serving = i
        if self.standby == i:
            self.standby = None
        if self.warm == i:
            self.warm = None
        self.retry_at.pop(version, None)
        if old is None:
            return
        if self.live[old].alive:
            self.standby = old
        else:  # every replica of it had died: the switch stops it, nothing to keep warm
            self._free(old)

    # -- rule 5: Staging ------------------------------------------------------------

    def _follow_staging(self, version: str | None, production: str | None) -> None:
        if self.warm is not None and self._version_of(self.warm) != version:
            self._do(ForgetWarm(self.warm))  # rule 3 stops it once it is unneeded
            self.warm = None
        if version is None or version in (self._version_of(self.serving), production):
            return
        if self.now < self.retry_at.get(version, 0.0):
            return
        i = self._slot_of(version)
        if i is None:
            self._start(version, STAGING)
        elif self.live[i].proved and self.warm != i:
            self._do(MarkWarm(i, version))
            self.warm = i

    # -- the state as the plan leaves it --------------------------------------------

    def _do(self, action: Action) -> None:
        self.actions.append(action)

    def _start(self, version: str, role: str) -> None:
        if not self.free:
            self._do(WaitForSlot(version, role))
            return
        i = self.free.pop(0)
        self._do(Start(i, version, role))
        self.live[i] = SlotState(version=version, role=role)

    def _free(self, i: int) -> None:
        del self.live[i]
        self.free = sorted({*self.free, i})

    def _slot_of(self, version: str | None) -> int | None:
        if version is None:
            return None
        return next((i for i, slot in self.live.items() if slot.version == version), None)

    def _version_of(self, i: int | None) -> str | None:
        slot = self.live.get(i) if i is not None else None
        return slot.version if slot is not None else None
