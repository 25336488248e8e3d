"""The shadow mirror: each answered request sent again, off the request path, to Staging.

``stageflow serve --shadow`` compares Production and the Staging version on the same
live rows (champion vs challenger on live data, not only on the test split). Where
the copy is made:

- Caddy has no native mirroring (its ``reverse_proxy`` sends each request to one
  upstream), and a second proxy process in front of it would add a hop to every
  request and a new way for the front door to fail.
- The controller never sees requests: Caddy sends them straight to the replicas.
- The Production replica already holds each request's body and id in its ASGI
  middleware (``serving.inference_log.RequestIds``), and learns when the answer was
  sent. So the copy is made there, *after* the answer went out: the body (the bytes
  already received, no copy) goes onto a bounded queue (~1 µs), and a sender thread
  of the replica posts it to the warm Staging replicas the controller already runs
  for the promotion (no extra servers). The Staging replica's own middleware sees
  the shadow header and logs the rows as ``source=shadow`` under its own version,
  with the same request id and row index as Production's.

The cost is bounded: one sender thread per Production replica (so at most one shadow
request in flight from each), a queue of ``QUEUE_REQUESTS`` requests past which new
ones are dropped (counted), and a timeout per shadow request. A slow, hung (SIGSTOP)
or dead shadow therefore costs shadow rows, never a client's answer, latency or
status. The counts (mirrored, dropped, failed, the shadow's latency) are served on
``GET STATS_PATH`` by every replica and logged every ``REPORT_SECONDS``.

Which replicas to mirror to is a small JSON file the controller rewrites when the
warm Staging version or its ready replicas change (:func:`publish`); each sender
re-reads it when its modification time changes (one ``stat`` a second).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import queue
import threading
import time
from pathlib import Path

logger = logging.getLogger("serving.inference_log")

SHADOW_HEADER = "X-Stageflow-Shadow"  # on a mirrored request: the Production version it shadows
STATS_PATH = "/stageflow/shadow"
QUEUE_REQUESTS = 256
TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 0.5
CHECK_SECONDS = 1.0
REPORT_SECONDS = 60.0
LATENCIES_KEPT = 2048


def publish(path: Path, version: str | None, urls: list[str]) -> None:
    """Write the shadow target (``version`` at ``urls``; nothing when ``version`` is None).

    Atomic (temporary file, then rename), so a replica never reads half of it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": version, "urls": list(urls)} if version is not None else {}
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(body))
    os.replace(partial, path)


class Mirror:
    """A Production replica's copies of its answered requests, sent to the shadow version.

    Args:
        target_file: the controller's shadow target (:func:`publish`).
        version: the version this replica serves (it never mirrors to itself).
        queue_requests: requests waiting for the sender, past which new ones are dropped.
        timeout: seconds a shadow request may take before it counts as failed.
    """

    def __init__(
        self,
        target_file: str | Path,
        version: str,
        queue_requests: int = QUEUE_REQUESTS,
        timeout: float = TIMEOUT_S,
    ):
        self.target_file = Path(target_file)
        self.version = str(version)
        self.timeout = timeout
        self.mirrored = 0  # answered by the shadow (any status)
        self.dropped = 0  # never sent: the queue was full (counted on the request path)
        self._gone = 0  # never sent: the shadow went away while it waited (the sender's count)
        self.failed = 0  # sent, but the shadow did not answer in time, or refused the connection
        self.shadow_errors = 0  # the shadow answered with a 5xx
        self._latencies: collections.deque = collections.deque(maxlen=LATENCIES_KEPT)
        self._queue: queue.Queue = queue.Queue(maxsize=queue_requests)
        self._target: tuple[str | None, list[str]] = (None, [])
        self._seen_mtime: float | None = None
        self._next = 0
        self._thread: threading.Thread | None = None
        self._reported = (0, 0, 0)

    @property
    def shadow_version(self) -> str | None:
        """The version being mirrored to now, if any."""
        return self._target[0]

    def start(self) -> Mirror:
        self._thread = threading.Thread(target=self._send_loop, name="shadow-mirror", daemon=True)
        self._thread.start()
        return self

    # -- the request side (cheap, never raises) --

    def offer(self, body: bytes, content_type: str | None, request_id: str) -> bool:
        """Queue one answered request for the shadow; False (and counted) when it was dropped."""
        if self._target[0] is None:
            return False  # nothing to shadow: not a drop, there is no shadow
        try:
            self._queue.put_nowait((body, content_type, request_id))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def stats(self) -> dict:
        """What the mirror did so far: counts and the shadow's latency (p50/p99, ms)."""
        latencies = sorted(self._latencies)

        def quantile(q: float) -> float | None:
            if not latencies:
                return None
            return round(latencies[min(len(latencies) - 1, int(q * len(latencies)))], 3)

        return {
            "version": self.version,
            "shadow_version": self.shadow_version,
            "mirrored": self.mirrored,
            "dropped": self.dropped + self._gone,
            "failed": self.failed,
            "shadow_errors": self.shadow_errors,
            "queued": self._queue.qsize(),
            "queue_limit": self._queue.maxsize,
            "shadow_latency_p50_ms": quantile(0.5),
            "shadow_latency_p99_ms": quantile(0.99),
        }

    # -- the sender thread --

    def _send_loop(self) -> None:
        import requests  # noqa: PLC0415 - only in a replica that mirrors

        session = requests.Session()
        reported_at = time.monotonic()
        while True:
            self._refresh_target()
            try:
                body, content_type, request_id = self._queue.get(timeout=CHECK_SECONDS)
            except queue.Empty:
                body = None
            if body is not None:
                self._send(session, body, content_type, request_id)
            if time.monotonic() - reported_at >= REPORT_SECONDS:
                reported_at = time.monotonic()
                self._report()

    def _send(self, session, body: bytes, content_type: str | None, request_id: str) -> None:
        version, urls = self._target
        if version is None or not urls:
            self._gone += 1
            return
        url = urls[self._next % len(urls)]
        self._next += 1
        headers = {"X-Request-Id": request_id, SHADOW_HEADER: self.version}
        if content_type:
            headers["Content-Type"] = content_type
        started = time.perf_counter()
        try:
            answer = session.post(
                url + "/invocations",
                data=body,
                headers=headers,
                timeout=(CONNECT_TIMEOUT_S, self.timeout),
            )
        except Exception:  # noqa: BLE001 - a slow, hung or dead shadow costs its rows, nothing else
            self.failed += 1
            session.close()  # a hung connection is not reused
            return
        self._latencies.append((time.perf_counter() - started) * 1000.0)
        self.mirrored += 1
        if answer.status_code >= 500:
            self.shadow_errors += 1

    def _refresh_target(self) -> None:
        try:
            mtime = self.target_file.stat().st_mtime
        except OSError:
            mtime = None
        if mtime == self._seen_mtime:
            return
        self._seen_mtime = mtime
        target: dict = {}
        if mtime is not None:
            with contextlib.suppress(OSError, ValueError):
                target = json.loads(self.target_file.read_text())
        version = target.get("version")
        version = None if version is None or str(version) == self.version else str(version)
        urls = [str(u) for u in target.get("urls") or []] if version else []
        if (version, urls) != self._target:
            self._target = (version, urls)
            if version is not None:
                logger.info(
                    "shadow: version %s's answered requests are mirrored to version %s (%d "
                    "replica(s))",
                    self.version,
                    version,
                    len(urls),
                )

    def _report(self) -> None:
        counts = (self.mirrored, self.dropped + self._gone, self.failed)
        if counts == self._reported:
            return
        self._reported = counts
        stats = self.stats()
        logger.info(
            "shadow of version %s → %s: %d mirrored, %d dropped (queue full), %d failed, "
            "shadow p50 %s ms",
            self.version,
            stats["shadow_version"],
            *counts,
            stats["shadow_latency_p50_ms"],
        )
