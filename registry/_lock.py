"""A per-model lock held in the registry itself, so promoters on any machine exclude each other.

Why this and not a tag: MLflow's REST API has no transactions and no
compare-and-set on tags -- two promoters that each write a "lock" tag and read
it back can both see their own value (A writes, A reads, B writes, B reads).
What the API does have is one atomic test-and-set: ``create_registered_model``
fails with ``RESOURCE_ALREADY_EXISTS`` when the name exists, enforced by the
backend's unique constraint (SQLite and PostgreSQL alike). The lock is built on
that alone.

The lock of model ``M`` is a sequence of *generations*: registered models named
``stageflow-lock.M.<n>``. Each carries its owner, a token and a lease expiry
as tags, written in the same create call (one backend transaction).

- **Acquire**: read the highest generation ``n``. If none exists, or ``n`` is
  released, expired, or owned by a dead process on this host, create ``n + 1``.
  Exactly one creator of ``n + 1`` succeeds; everyone else re-reads and waits.
- **Verify**: after creating ``k``, the winner checks that no generation above
  ``k`` exists. A promoter acting on a stale read can only create a generation
  *below* the current top (one that the top's holder deleted); its own
  verification then sees the higher one, and it deletes its generation and
  retries. The top generation is never deleted by anyone but its creator,
  and a new top is only created once the old one is free, so at most one
  process holds a valid generation at a time.
- **Release**: tag the generation ``released``. The next holder deletes the
  generations below its own, so one or two lock models exist per model.
- **Leases**: a holder that dies (process killed, machine lost) blocks others
  only until its lease expires, or not at all when it ran on this host and its
  pid is gone. A live holder checks it still has lease left before every
  registry write (``ensure``), renewing it; a process paused for longer than
  the lease (120 s) is the one case this cannot exclude -- the verify-after-write
  in the transition and ``status`` catch what it would leave.

Waiting is by polling the registry with jittered back-off, never by a fixed sleep.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
import uuid
from dataclasses import dataclass

from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException

from stageflow import tracking
from stageflow.errors import StageflowError

logger = logging.getLogger(__name__)

LOCK_PREFIX = "stageflow-lock."
LEASE_SECONDS = 120.0
WAIT_SECONDS = 300.0
# A holder never starts a registry write with less lease than this left.
SAFETY_SECONDS = 30.0
TAG = "stageflow.lock"


class LockTimeout(StageflowError):
    """Another promoter held the model's lock for longer than we were willing to wait."""


@dataclass
class Lease:
    client: MlflowClient
    model: str
    generation: int
    token: str
    owner: str
    expires: float

    @property
    def name(self) -> str:
        return lock_name(self.model, self.generation)

    def ensure(self) -> None:
        """Renew the lease before a registry write; refuse to write if it was lost."""
        current = _read(self.client, self.name)
        if current is None or current.get("token") != self.token:
            raise StageflowError(
                f"lost the registry lock of {self.model} (generation {self.generation}); "
                "nothing more was written -- run `stageflow status` and re-run the command"
            )
        if self.expires - time.time() < SAFETY_SECONDS:
            raise StageflowError(
                f"the registry lock of {self.model} expired while the gates ran; re-run the command"
            )
        self.expires = time.time() + LEASE_SECONDS
        self.client.set_registered_model_tag(self.name, f"{TAG}.expires", f"{self.expires:.3f}")

    def release(self) -> None:
        try:
            self.client.set_registered_model_tag(self.name, f"{TAG}.released", "true")
        except MlflowException as exc:  # the lease expires anyway
            logger.warning("could not release the lock %s: %s", self.name, exc.message)


def lock_name(model: str, generation: int) -> str:
    return f"{LOCK_PREFIX}{model}.{generation}"


def is_lock_model(name: str) -> bool:
    return name.startswith(LOCK_PREFIX)


def acquire(
    client: MlflowClient, model: str, owner: str, wait_seconds: float = WAIT_SECONDS
) -> Lease:
    """Hold the lock of ``model``; wait (polling) while another promoter holds it.

    Raises:
        LockTimeout: still held by someone else after ``wait_seconds``.
    """
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_seconds
    delay = 0.05
    while True:
        generations = _generations(client, model)
        top = generations[-1] if generations else None
        holder = _holder(top) if top else None
        if holder is None:
            candidate = (top[0] + 1) if top else 1
            lease = _try_create(client, model, candidate, token, owner)
            if lease is not None:
                _cleanup(client, model, below=candidate)
                logger.debug("holding %s", lease.name)
                return lease
        if time.monotonic() > deadline:
            raise LockTimeout(
                f"the registry lock of {model} is held by {holder or 'another promoter'}; "
                f"waited {wait_seconds:.0f}s. Retry later, or see `stageflow status`"
            )
        time.sleep(delay * (0.5 + random.random()))
        delay = min(delay * 2, 1.0)


def describe(client: MlflowClient, model: str) -> str | None:
    """Who holds the lock of ``model`` now, or None (for ``status``)."""
    generations = _generations(client, model)
    return _holder(generations[-1]) if generations else None


def _try_create(client, model, generation, token, owner) -> Lease | None:
    expires = time.time() + LEASE_SECONDS
    record = {
        "token": token,
        "owner": owner,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "expires": f"{expires:.3f}",
    }
    name = lock_name(model, generation)
    try:
        client.create_registered_model(
            name,
            tags={f"{TAG}.{k}": v for k, v in record.items()},
            description=f"Stageflow's promotion lock for {model}; not a model.",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Someone else won this generation -- unless a retried request of ours did.
        record = _read(client, name)
        if record is None and not _visible(client, name):
            raise StageflowError(
                f"the registry lock {name} exists but this user cannot see it, so promotions "
                f"of {model} cannot take turns; on a server with --auth every promoter needs "
                f"`stageflow server user add USER --role promoter --model {model}`"
            ) from None
        if (record or {}).get("token") != token:
            return None
    higher = [g for g, _ in _generations(client, model) if g > generation]
    if higher:  # we acted on a stale read: our generation is not the top
        _delete(client, name)
        return None
    return Lease(client, model, generation, token, owner, expires)


def _generations(client: MlflowClient, model: str) -> list[tuple[int, RegisteredModel]]:
    prefix = lock_name(model, 0)[:-1]
    found = []
    token = None
    while True:
        # LIKE also matches `_`/`%` in the model name loosely; the exact prefix check below.
        page = client.search_registered_models(
            filter_string=f"name LIKE {tracking.filter_value(prefix + '%')}",
            max_results=1000,
            page_token=token,
        )
        for registered in page:
            suffix = registered.name[len(prefix) :]
            if registered.name.startswith(prefix) and suffix.isdigit():
                found.append((int(suffix), registered))
        token = page.token
        if not token:
            break
    return sorted(found, key=lambda pair: pair[0])


def _holder(generation: tuple[int, RegisteredModel]) -> str | None:
    """Who holds this generation, or None when it is free (released, expired, owner dead)."""
    tags = generation[1].tags
    if tags.get(f"{TAG}.released") == "true":
        return None
    try:
        expires = float(tags.get(f"{TAG}.expires", "0"))
    except ValueError:
        expires = 0.0
    if expires < time.time():
        return None
    host, pid = tags.get(f"{TAG}.host"), tags.get(f"{TAG}.pid", "")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return None
    left = expires - time.time()
    return f"{tags.get(f'{TAG}.owner', '?')} (pid {pid} on {host}, lease {left:.0f}s left)"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(client: MlflowClient, name: str) -> dict | None:
    try:
        tags = client.get_registered_model(name).tags
    except MlflowException:
        return None
    return {k.removeprefix(f"{TAG}."): v for k, v in tags.items() if k.startswith(TAG)}


def _visible(client: MlflowClient, name: str) -> bool:
    """Whether this user can read the registered model ``name`` (auth may hide it)."""
    try:
        client.get_registered_model(name)
    except MlflowException as exc:
        return exc.error_code not in ("PERMISSION_DENIED", "UNAUTHENTICATED")
    return True


def _cleanup(client: MlflowClient, model: str, below: int) -> None:
    for generation, _ in _generations(client, model):
        if generation < below:
            _delete(client, lock_name(model, generation))


def _delete(client: MlflowClient, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except MlflowException:
        pass  # deleted meanwhile by another holder's cleanup
