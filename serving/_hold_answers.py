"""A model server's answer leaves in one write, so a replica that dies mid-answer sent nothing.

uvicorn writes a response's status line and headers, then its body, as separate
socket writes, and MLflow's scoring server runs its answers through a Starlette
``@app.middleware("http")``, which can let the event loop run between the two.
A replica killed in that gap has sent its headers and no body. Caddy 2.11 has by
then committed those headers to the client (it forwards them as soon as the
upstream's round trip returns, before reading the body; ``response_buffers``
does not change that, and it never retries once the round trip succeeded:
caddyserver/caddy#7845, #8053), so the client got a 200 with a truncated body.

This protocol holds what uvicorn writes while a response is being sent and
writes it all once the response is complete. A replica that dies mid-answer has
then sent nothing at all, which Caddy sees as a failed round trip and retries on
a sibling (``lb_retry_match`` in ``serving/frontdoor.py``). Answers larger than
``HOLD_LIMIT_BYTES`` go out as they come (a batch that big is rare on the REST
path), so memory stays bounded.

``mlflow models serve`` starts uvicorn, which reads ``UVICORN_HTTP`` as its
``--http`` option: ``serving._model_server`` sets it to ``PROTOCOL``.
Hand-written because neither uvicorn nor Caddy has an option for it.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

# ``--http`` takes an import string for a protocol class.
PROTOCOL = f"{__name__}:WholeAnswerProtocol"
HOLD_LIMIT_BYTES = 1024 * 1024


class _HoldingTransport:
    """A transport that keeps writes back while its connection is in the middle of an answer."""

    def __init__(self, transport: asyncio.Transport, protocol: WholeAnswerProtocol):
        self._transport = transport
        self._protocol = protocol
        self._held = bytearray()

    def write(self, data: bytes) -> None:
        self._held += data
        # h11 is in SEND_BODY from the response's headers until its end of message.
        mid_answer = self._protocol.conn.our_state is h11.SEND_BODY
        if not mid_answer or len(self._held) > HOLD_LIMIT_BYTES:
            self._flush()

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def write_eof(self) -> None:
        self._flush()
        self._transport.write_eof()

    def _flush(self) -> None:
        if self._held:
            data, self._held = bytes(self._held), bytearray()
            self._transport.write(data)

    def __getattr__(self, name: str):
        # Everything else (is_closing, get_extra_info, pause_reading, abort, …) is the transport's.
        return getattr(self._transport, name)


class WholeAnswerProtocol(H11Protocol):
    """uvicorn's h11 protocol, writing each response in one piece (see the module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(_HoldingTransport(transport, self))  # type: ignore[arg-type]
