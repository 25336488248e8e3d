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
- **Whose clock**: the tracking server's, never a promoter's (a promoter whose
  clock ran minutes ahead once took a lock another held). A lease starts at the
  generation's ``creation_timestamp`` and is renewed by ``update_registered_model``,
  whose ``last_updated_timestamp`` the server stamps -- both the SQL and the file
  store set these from their own clock and take no time from the client
  (``set_registered_model_tag`` does not touch it in the SQL store, so renewal
  is not a tag). Whether another's lease ran out is judged against the server's
  ``Date`` header; the holder itself counts its lease on its monotonic clock
  from just before its last renewal was sent, which never outlasts the server's view.
- **Sequence**: only a holder writes the ledger, and it numbers each entry one
  past the last (``registry.ledger``), so the entries' order is the order the
  holders took turns in, whatever their clocks said; each entry also records the
  lock generation and the server time it was written under.

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
from email.utils import parsedate_to_datetime

from mlflow import MlflowClient
from mlflow.entities.model_registry import RegisteredModel
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from stageflow import tracking
from stageflow.errors import StageflowError

logger = logging.getLogger(__name__)

LOCK_PREFIX = "stageflow-lock."
LEASE_SECONDS = 120.0
WAIT_SECONDS = 300.0
# A holder never starts a registry write with less lease than this left.
SAFETY_SECONDS = 30.0
TAG = "stageflow.lock"
# One cheap route any authenticated user may call; only its Date header is read.
CLOCK_PROBE = "/api/2.0/mlflow/experiments/search"


class LockTimeout(StageflowError):
    """Another promoter held the model's lock for longer than we were willing to wait."""


@dataclass
class Lease:
    """A held generation of a model's lock.

    Attributes:
        renewed_at: the holder's ``time.monotonic()`` just before its last renewal was
            sent; the lease lasts ``LEASE_SECONDS`` from then, by the holder's count.
        server_time: the server's stamp of the last renewal (seconds since the epoch).
    """

    client: MlflowClient
    model: str
    generation: int
    token: str
    owner: str
    renewed_at: float
    server_time: float

    @property
    def name(self) -> str:
        return lock_name(self.model, self.generation)

    def left(self) -> float:
        """Seconds of lease left, by the holder's monotonic clock."""
        return LEASE_SECONDS - (time.monotonic() - self.renewed_at)

    def ensure(self) -> None:
        """Renew the lease before a registry write; refuse to write if it was lost."""
        current = _read(self.client, self.name)
        if current is None or current.get("token") != self.token:
            raise StageflowError(
                f"lost the registry lock of {self.model} (generation {self.generation}); "
                "nothing more was written -- run `stageflow status` and re-run the command"
            )
        if self.left() < SAFETY_SECONDS:
            raise StageflowError(
                f"the registry lock of {self.model} expired while the gates ran; re-run the command"
            )
        sent = time.monotonic()
        # A description write: the server stamps last_updated_timestamp (a tag write does not).
        renewed = self.client.update_registered_model(self.name, _description(self.model))
        self.renewed_at = sent
        self.server_time = renewed.last_updated_timestamp / 1000

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
        holder = _holder(top, server_now(client)) if top else None
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
    return _holder(generations[-1], server_now(client)) if generations else None


def server_now(client: MlflowClient) -> float:
    """The tracking server's clock (seconds since the epoch, to the second below).

    Read from the ``Date`` header of one cheap API call; a local store (no server)
    shares this process's clock. Rounding down errs towards "still held".
    """
    uri = client.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return time.time()
    answer = http_request(
        get_default_host_creds(uri),
        CLOCK_PROBE,
        "GET",
        params={"max_results": 1},
        timeout=30,
        raise_on_status=False,
    )
    date = answer.headers.get("Date")
    if not date:
        raise StageflowError(
            f"the tracking server at {uri} sent no Date header, so the registry lock cannot "
            "tell whose lease ran out; reach it directly or through a proxy that keeps Date"
        )
    return parsedate_to_datetime(date).timestamp()


def _description(model: str) -> str:
    return f"Stageflow's promotion lock for {model}; not a model."


def _try_create(client, model, generation, token, owner) -> Lease | None:
    record = {
        "token": token,
        "owner": owner,
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }
    name = lock_name(model, generation)
    sent = time.monotonic()
    try:
        created = client.create_registered_model(
            name, tags={f"{TAG}.{k}": v for k, v in record.items()}, description=_description(model)
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
        created = client.get_registered_model(name)
    higher = [g for g, _ in _generations(client, model) if g > generation]
    if higher:  # we acted on a stale read: our generation is not the top
        _delete(client, name)
        return None
    stamp = created.last_updated_timestamp or created.creation_timestamp
    return Lease(client, model, generation, token, owner, sent, stamp / 1000)


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


def _holder(generation: tuple[int, RegisteredModel], now: float) -> str | None:
    """Who holds this generation, or None when it is free (released, expired, owner dead).

    ``now`` is the server's clock; the lease runs from the server's stamp of the last
    renewal (or of the creation), never from a time a promoter wrote.
    """
    registered = generation[1]
    tags = registered.tags
    if tags.get(f"{TAG}.released") == "true":
        return None
    renewed = (registered.last_updated_timestamp or registered.creation_timestamp or 0) / 1000
    left = renewed + LEASE_SECONDS - now
    if left < 0:
        return None
    host, pid = tags.get(f"{TAG}.host"), tags.get(f"{TAG}.pid", "")
    if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
        return None
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
