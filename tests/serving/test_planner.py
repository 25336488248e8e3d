"""The serving planner's rules, in milliseconds: no servers, a fake clock.

Each test states what the controller observed (the registry's stages, its
slots) and asserts the actions :func:`serving._planner.plan` returns. The
tests that follow several polls use :class:`World`, which carries out the
actions on the observed state the way ``serving._effects`` does on real slots.
The real servers, switches and restarts are in ``tests/serving/test_serve.py``.
"""

from __future__ import annotations

import dataclasses

from registry import PRODUCTION, STAGING
from serving._planner import (
    Action,
    ForgetWarm,
    GiveUp,
    MarkWarm,
    RegistryState,
    ReplaceReplica,
    ReplicaState,
    RestartReplica,
    RetryReplicaLater,
    SlotState,
    Start,
    StartSibling,
    State,
    Stop,
    Switch,
    SwitchPolicy,
    WaitForSlot,
    plan,
)

POLICY = SwitchPolicy(drain=1.0, retry_after=30.0)
NOW = 100.0
FREE = SlotState()
READY = ReplicaState()
STARTING = ReplicaState(ready=False)
DEAD = ReplicaState(alive=False)  # it had proved itself, then its process exited


def live(
    version: str,
    role: str = PRODUCTION,
    *,
    proved: bool = True,
    replicas: tuple[ReplicaState, ...] = (READY,),
    routed: bool = False,
    unrouted_at: float = 0.0,
    failure: str | None = None,
) -> SlotState:
    return SlotState(
        version=version,
        role=role,
        proved=proved,
        failure=failure,
        routed=routed,
        unrouted_at=unrouted_at,
        replicas=replicas,
    )


def actions(
    slots: list[SlotState],
    production: str | None,
    staging: str | None = None,
    *,
    reachable: bool = True,
    now: float = NOW,
    **memory,
) -> tuple[Action, ...]:
    """The actions for one poll of ``slots`` against the registry's stages."""
    registry = RegistryState(production, staging) if reachable else None
    return plan(State(now, registry, tuple(slots), **memory), POLICY).actions


def starts(found: tuple[Action, ...]) -> list[Start]:
    return [action for action in found if isinstance(action, Start)]


class World:
    """Slots that change as ``serving._effects`` changes them, polled on a fake clock."""

    def __init__(self, slots: int = 4, replicas: int = 1):
        self.slots = [FREE] * slots
        self.replicas = replicas
        self.serving: int | None = None
        self.standby: int | None = None
        self.warm: int | None = None
        self.unneeded: dict[int, str] = {}
        self.retry_at: dict[str, float] = {}
        self.now = NOW

    def poll(
        self, production: str | None, staging: str | None = None, reachable: bool = True
    ) -> tuple[Action, ...]:
        return self.poll_state(RegistryState(production, staging) if reachable else None)

    def poll_state(self, registry: RegistryState | None) -> tuple[Action, ...]:
        state = State(
            self.now,
            registry,
            tuple(self.slots),
            self.serving,
            self.standby,
            self.warm,
            dict(self.unneeded),
            dict(self.retry_at),
        )
        planned = plan(state, POLICY)
        self.unneeded = dict(planned.unneeded)
        for action in planned.actions:
            self._carry_out(action)
        return planned.actions

    def wait(self, seconds: float) -> None:
        self.now += seconds

    def slot_of(self, version: str) -> int:
        return next(i for i, slot in enumerate(self.slots) if slot.version == version)

    def prove(self, version: str) -> None:
        i = self.slot_of(version)
        self.slots[i] = dataclasses.replace(
            self.slots[i], proved=True, replicas=(READY,) * self.replicas
        )

    def fail(self, version: str, error: str = "exited with code 1 before it was ready") -> None:
        i = self.slot_of(version)
        self.slots[i] = dataclasses.replace(self.slots[i], failure=error)

    @property
    def versions(self) -> dict[str, str | None]:
        """What serves, stands by and is warm."""
        return {
            role: self.slots[i].version if i is not None else None
            for role, i in (
                ("serving", self.serving),
                ("standby", self.standby),
                ("warm", self.warm),
            )
        }

    def _carry_out(self, action: Action) -> None:
        match action:
            case Start(slot=i):
                self.slots[i] = live(
                    action.version, action.role, proved=False, replicas=(STARTING,) * self.replicas
                )
            case GiveUp(slot=i):
                self.slots[i] = FREE
                self.retry_at[action.version] = action.retry_at
            case Stop(slot=i):
                self.slots[i] = FREE
                self.warm = None if self.warm == i else self.warm
                self.standby = None if self.standby == i else self.standby
            case Switch(slot=i):
                old = self.serving
                self.slots[i] = dataclasses.replace(self.slots[i], routed=True)
                self.serving = i
                self.standby = None if self.standby == i else self.standby
                self.warm = None if self.warm == i else self.warm
                self.retry_at.pop(action.version, None)
                if old is not None:
                    self.slots[old] = dataclasses.replace(
                        self.slots[old], routed=False, unrouted_at=self.now
                    )
                    self.standby = old
            case MarkWarm(slot=i):
                self.warm = i
            case ForgetWarm():
                self.warm = None
            case _:  # the replica actions are tested on single plans
                raise AssertionError(f"unexpected {action}")


# -- Production --------------------------------------------------------------------


def test_with_no_production_version_yet_nothing_starts():
    assert actions([FREE, FREE], production=None) == ()


def test_the_first_production_version_starts_on_the_lowest_free_slot():
    assert actions([live("7", STAGING), FREE, FREE], production="1") == (Start(1, "1", PRODUCTION),)


def test_a_cold_version_is_not_switched_to_while_no_replica_has_proved_itself():
    starting = live("2", proved=False, replicas=(STARTING, STARTING))
    assert actions([live("1", routed=True), starting], production="2", serving=0) == ()


NOT_STARTED = ReplicaState(running=False, alive=False, ready=False)


def test_a_version_s_siblings_wait_while_its_first_replica_starts_alone():
    starting = live("2", proved=False, replicas=(STARTING, NOT_STARTED))
    assert actions([live("1", routed=True), starting], production="2", serving=0) == ()


def test_a_version_s_siblings_start_once_its_first_replica_proved_itself():
    first_proved = live("2", replicas=(READY, NOT_STARTED, NOT_STARTED))
    assert actions([live("1", routed=True), first_proved], production="2", serving=0) == (
        StartSibling(1, 1),
        StartSibling(1, 2),
        Switch(1, "2"),
    )


def test_a_cold_version_is_switched_to_once_one_replica_proved_itself():
    one_ready = live("2", replicas=(READY, STARTING))
    assert actions([live("1", routed=True), one_ready], production="2", serving=0) == (
        Switch(1, "2"),
    )


def test_a_proved_version_whose_replicas_all_died_is_not_switched_to():
    died = live("2", replicas=(DEAD,))
    found = actions([live("1", routed=True), died], production="2", serving=0)
    assert not any(isinstance(action, Switch) for action in found)


def test_promotion_to_the_warm_staging_version_is_a_switch_and_starts_nothing():
    slots = [live("1", routed=True), live("2", STAGING)]
    assert actions(slots, production="2", staging=None, serving=0, warm=1) == (Switch(1, "2"),)


def test_rollback_to_the_standby_is_a_switch_and_starts_nothing():
    slots = [live("1", unrouted_at=50.0), live("2", routed=True)]
    assert actions(slots, production="1", serving=1, standby=0) == (Switch(0, "1"),)


def test_what_serves_already_is_left_as_it_is():
    slots = [live("1", routed=True), live("2", unrouted_at=50.0)]
    assert actions(slots, production="1", serving=0, standby=1) == ()


def test_the_replaced_production_stays_warm_as_the_standby_and_the_old_standby_stops():
    world = World()
    world.poll("1")
    world.prove("1")
    world.poll("1")
    world.poll("2")
    world.prove("2")
    assert world.poll("2") == (Switch(1, "2"),)
    assert world.versions == {"serving": "2", "standby": "1", "warm": None}
    # The standby is kept for as long as it is the standby.
    for _ in range(5):
        world.wait(1.0)
        assert world.poll("2") == ()
    world.poll("3")
    world.prove("3")
    world.wait(1.0)
    assert world.poll("3") == (Switch(2, "3"),)
    assert world.versions["standby"] == "2"
    # Version 1 is no longer the standby: stopped on the second poll that finds it unneeded.
    world.wait(1.0)
    assert world.poll("3") == ()
    world.wait(1.0)
    assert world.poll("3") == (Stop(0, "1", "no longer the rollback standby"),)


def test_a_version_unneeded_on_one_read_only_is_not_stopped():
    # A read that raced a promotion (the version left Staging, Production not read yet).
    slots = [live("1", routed=True), live("2", STAGING)]
    planned = plan(State(NOW, RegistryState("1", None), tuple(slots), serving=0), POLICY)
    assert planned.actions == ()
    assert planned.unneeded == {1: "2"}
    # The next read agrees: now it stops.
    again = plan(
        State(NOW + 1, RegistryState("1", None), tuple(slots), serving=0, unneeded={1: "2"}),
        POLICY,
    )
    assert again.actions == (Stop(1, "2", "no longer in Staging"),)
    assert again.unneeded == {}


def test_an_unrouted_version_stops_only_after_the_drain():
    slots = [live("1", unrouted_at=NOW - 0.5), live("2", routed=True)]
    memory = {"serving": 1, "unneeded": {0: "1"}}
    assert actions(slots, production="2", **memory) == ()
    assert actions(slots, production="2", now=NOW + 0.5, **memory) == (
        Stop(0, "1", "no longer the rollback standby"),
    )


def test_a_dead_unrouted_version_needs_no_drain():
    slots = [live("1", unrouted_at=NOW - 0.5, replicas=()), live("2", routed=True)]
    assert actions(slots, production="2", serving=1, unneeded={0: "1"}) == (
        Stop(0, "1", "no longer the rollback standby"),
    )


def test_two_quick_promotions_in_a_row_serve_the_old_version_until_the_last_is_ready():
    world = World()
    world.poll("1")
    world.prove("1")
    world.poll("1")
    assert world.poll("2") == (Start(1, "2", PRODUCTION),)
    world.wait(1.0)
    # Promoted again before version 2 proved itself: 3 starts beside it.
    assert world.poll("3") == (Start(2, "3", PRODUCTION),)
    world.prove("2")  # version 2 is ready now, but no longer Production
    world.wait(1.0)
    assert world.poll("3") == (Stop(1, "2", "no longer Production"),)
    assert world.versions["serving"] == "1"
    world.prove("3")
    world.wait(1.0)
    assert world.poll("3") == (Switch(2, "3"),)
    assert world.versions == {"serving": "3", "standby": "1", "warm": None}


def test_with_every_slot_taken_a_new_version_waits_for_one_to_free_up():
    slots = [
        live("1", routed=True),
        live("0", unrouted_at=50.0),
        live("3", STAGING),
        live("2", proved=False, replicas=(STARTING,)),
    ]
    memory = {"serving": 0, "standby": 1, "warm": 2}
    # Production moves from 2 (still starting) to 4: no slot is free on this poll ...
    first = plan(State(NOW, RegistryState("4", "3"), tuple(slots), **memory), POLICY)
    assert first.actions == (WaitForSlot("4", PRODUCTION),)
    # ... and on the next, version 2 stops and 4 takes its slot.
    second = plan(
        State(NOW + 1, RegistryState("4", "3"), tuple(slots), unneeded=first.unneeded, **memory),
        POLICY,
    )
    assert second.actions == (Stop(3, "2", "no longer Production"), Start(3, "4", PRODUCTION))


# -- Staging -------------------------------------------------------------------------


def test_staging_is_started_ahead_of_its_promotion_and_marked_warm_once_proved():
    world = World()
    world.poll("1")
    world.prove("1")
    world.poll("1")
    assert world.poll("1", staging="2") == (Start(1, "2", STAGING),)
    assert world.poll("1", staging="2") == ()  # still starting: not warm yet
    world.prove("2")
    assert world.poll("1", staging="2") == (MarkWarm(1, "2"),)
    assert world.versions == {"serving": "1", "standby": None, "warm": "2"}


def test_staging_is_warmed_before_any_production_version_exists():
    assert actions([FREE, FREE], production=None, staging="1") == (Start(0, "1", STAGING),)


def test_when_staging_moves_on_the_old_warm_version_is_no_longer_warm_and_stops():
    world = World()
    world.poll("1")
    world.prove("1")
    world.poll("1", staging="2")
    world.prove("2")
    world.poll("1", staging="2")
    assert world.versions["warm"] == "2"
    assert world.poll("1", staging="3") == (ForgetWarm(1), Start(2, "3", STAGING))
    assert world.versions["warm"] is None
    world.wait(1.0)
    assert world.poll("1", staging="3") == (Stop(1, "2", "Staging is now version 3"),)
    world.prove("3")
    assert world.poll("1", staging="3") == (MarkWarm(2, "3"),)


def test_staging_that_is_the_rollback_standby_is_warm_without_a_start():
    slots = [live("1", unrouted_at=50.0), live("2", routed=True)]
    assert actions(slots, production="2", staging="1", serving=1, standby=0) == (MarkWarm(0, "1"),)


def test_staging_that_is_production_starts_nothing():
    assert actions([live("1", routed=True), FREE], production="1", staging="1", serving=0) == ()


def test_staging_that_still_serves_while_production_moves_on_is_not_marked_warm():
    slots = [live("1", routed=True), live("2", proved=False, replicas=(STARTING,))]
    assert actions(slots, production="2", staging="1", serving=0) == ()


def test_a_switch_leaves_the_old_production_warm_for_a_staging_of_it_in_the_same_poll():
    slots = [live("1", routed=True), live("2")]
    assert actions(slots, production="2", staging="1", serving=0) == (
        Switch(1, "2"),
        MarkWarm(0, "1"),
    )


def test_a_switch_from_a_version_whose_replicas_all_died_frees_its_slot():
    waiting = ReplicaState(running=False, alive=False, ready=False, retry_at=NOW + 10)
    slots = [live("1", routed=True, replicas=(waiting,)), live("2")]
    assert actions(slots, production="2", staging="3", serving=0) == (
        Switch(1, "2"),
        Start(0, "3", STAGING),
    )


def test_a_switch_from_a_version_whose_replica_is_being_restarted_keeps_it_as_the_standby():
    slots = [live("1", routed=True, replicas=(DEAD,)), live("2")]
    assert actions(slots, production="2", staging="3", serving=0) == (
        RestartReplica(0, 0, exited=True),
        Switch(1, "2"),
        WaitForSlot("3", STAGING),
    )


# -- failures ------------------------------------------------------------------------


def test_a_version_that_failed_to_start_is_given_up_never_routed_and_retried_after_the_back_off():
    world = World()
    world.poll("1")
    world.prove("1")
    world.poll("1")
    world.poll("2")
    world.fail("2", "version 2's model server exited with code 1 before it was ready")
    assert world.poll("2") == (
        GiveUp(1, "2", "version 2's model server exited with code 1 before it was ready", 130.0),
    )
    # Until the back-off is over, nothing starts it; version 1 keeps serving.
    while world.now < 130.0:
        assert world.poll("2") == ()
        assert world.versions["serving"] == "1"
        world.wait(5.0)
    world.now = 130.0
    assert world.poll("2") == (Start(1, "2", PRODUCTION),)
    world.prove("2")
    assert world.poll("2") == (Switch(1, "2"),)
    assert world.retry_at == {}


def test_a_staging_version_that_failed_to_start_is_retried_after_the_back_off_too():
    slots = [live("1", routed=True), live("2", STAGING, proved=False, failure="refused")]
    assert actions(slots, production="1", staging="2", serving=0) == (
        GiveUp(1, "2", "refused", NOW + 30.0),
    )
    retry = {"serving": 0, "retry_at": {"2": NOW + 30.0}}
    assert actions([slots[0], FREE], "1", "2", now=NOW + 29.0, **retry) == ()
    assert actions([slots[0], FREE], "1", "2", now=NOW + 30.0, **retry) == (Start(1, "2", STAGING),)


def test_a_dead_replica_of_a_serving_version_is_restarted_while_its_siblings_serve():
    slots = [live("1", routed=True, replicas=(READY, DEAD))]
    assert actions(slots, production="1", serving=0) == (RestartReplica(0, 1, exited=True),)


def test_a_replica_whose_restart_failed_is_stopped_and_restarted_after_the_back_off():
    failed = ReplicaState(ready=False, failure="did not answer /ping within 120s")
    slots = [live("1", routed=True, replicas=(READY, failed))]
    assert actions(slots, production="1", serving=0) == (
        RetryReplicaLater(0, 1, "did not answer /ping within 120s", NOW + 30.0),
    )
    waiting = ReplicaState(running=False, alive=False, ready=False, retry_at=NOW + 30.0)
    slots = [live("1", routed=True, replicas=(READY, waiting))]
    assert actions(slots, production="1", now=NOW + 29.0, serving=0) == ()
    assert actions(slots, production="1", now=NOW + 30.0, serving=0) == (
        RestartReplica(0, 1, exited=False),
    )


def test_a_hung_replica_is_replaced_once_silent_for_replace_after_while_its_siblings_serve():
    hung = ReplicaState(silent_for=POLICY.replace_after)
    slots = [live("1", routed=True, replicas=(READY, hung))]
    assert actions(slots, production="1", serving=0) == (
        ReplaceReplica(0, 1, POLICY.replace_after),
    )


def test_a_replica_that_missed_pings_for_less_than_replace_after_is_left_running():
    # Out of the rotation already (its health answer says so), but requests sent to
    # it before that may still be timing out at the front door: not killed yet.
    quiet = ReplicaState(silent_for=POLICY.replace_after - 0.5)
    slots = [live("1", routed=True, replicas=(READY, quiet))]
    assert actions(slots, production="1", serving=0) == ()


def test_a_hung_replica_is_replaced_even_while_the_tracking_server_is_unreachable():
    hung = ReplicaState(silent_for=60.0)
    slots = [live("1", routed=True, replicas=(hung,))]
    assert actions(slots, production=None, reachable=False, serving=0) == (
        ReplaceReplica(0, 0, 60.0),
    )


def test_a_restarting_replica_is_left_to_prove_itself():
    slots = [live("1", routed=True, replicas=(READY, STARTING))]
    assert actions(slots, production="1", serving=0) == ()


# -- the tracking server unreachable -----------------------------------------------------


def test_with_the_tracking_server_unreachable_what_serves_is_kept_as_it_is():
    slots = [
        live("1", routed=True),
        live("0", unrouted_at=50.0),
        live("3", STAGING),
        live("2", proved=False, replicas=(STARTING,)),
    ]
    memory = {"serving": 0, "standby": 1, "warm": 2, "unneeded": {3: "2"}}
    planned = plan(State(NOW, None, tuple(slots), **memory), POLICY)
    assert planned.actions == ()
    assert planned.unneeded == {3: "2"}  # kept for when it answers again


def test_with_the_tracking_server_unreachable_a_dead_replica_is_still_restarted():
    slots = [live("1", routed=True, replicas=(DEAD,))]
    assert actions(slots, production=None, reachable=False, serving=0) == (
        RestartReplica(0, 0, exited=True),
    )


def test_with_no_production_version_any_more_the_last_one_keeps_serving():
    slots = [live("1", routed=True), live("0", unrouted_at=50.0)]
    assert actions(slots, production=None, serving=0, standby=1, unneeded={}) == ()


# -- a split Production (stage, alias and ledger disagree) -----------------------


def split(production: str | None, staging: str | None = None) -> RegistryState:
    return RegistryState(production, staging, split="@champion moved outside Stageflow")


def test_a_split_production_keeps_what_serves_and_switches_to_nothing():
    # @champion moved to the Staging version by hand: it stays Staging's (and warm).
    slots = [live("1", routed=True), live("2", STAGING)]
    state = State(NOW, split("2", staging="2"), tuple(slots), serving=0, warm=1)
    assert plan(state, POLICY).actions == ()


def test_a_split_production_starts_nothing_when_nothing_serves_yet():
    state = State(NOW, split("3"), (FREE, FREE))
    assert plan(state, POLICY).actions == ()


def test_a_split_production_keeps_the_version_it_names_live_but_unrouted():
    world = World()
    world.poll("1")
    world.prove("1")
    world.poll("1")
    world.poll("1", "2")
    world.prove("2")
    world.poll("1", "2")
    for _ in range(3):  # the split lasts several polls: the named version is neither
        assert world.poll_state(split("2", staging="2")) == ()  # switched to nor stopped
        world.wait(10.0)
    assert world.versions["serving"] == "1"
    assert Switch(world.slot_of("2"), "2") in world.poll("2")  # settled again: it follows
