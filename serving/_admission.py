"""What a replica admits: rows per request, requests at once, and only bodies it can read.

MLflow's scoring server parses whatever arrives and answers its own parse errors
with the whole body quoted back, a body nested deeper than Python's recursion
limit with a 500 and a traceback in the log, and costs what the body decodes to:
200,000 JSON rows took 9.6 s of a replica's CPU, and 62 KiB of Parquet decoded
to a million rows. :class:`Admission` is the pure-ASGI middleware in front of
it on every ``stageflow serve`` replica (installed with :class:`RequestIds`,
``serving/inference_log.py``):

- at most ``max_concurrency`` ``/invocations`` requests at once; past it, 503
  with ``Retry-After``, before the body is read. uvicorn's ``--limit-concurrency``
  (which ``mlflow models serve`` cannot pass but ``UVICORN_LIMIT_CONCURRENCY``
  could) counts idle keep-alive connections too, and the front door holds a pool
  of them, and it answers in plain text;
- the body read (at most the front door's cap), then counted before MLflow decodes
  it: JSON parsed once here (a body too deep, not JSON or of the wrong shape is
  400), CSV by its lines, Parquet by its footer (rows, and the bytes its columns
  decode to, dictionaries expanded) so a small file that decodes to millions of
  rows never is. More than ``max_rows`` rows is 413, pointing at batch scoring;
- an error answer that is not Stageflow's own (MLflow's parse and type errors,
  its 504) is replaced by a fixed message in the same shape, so no answer quotes
  the payload; an exception answers 500 with one line in the log, no traceback.

Every refusal has the stable JSON shape of the guarded model's (``error_code``,
``message``, ``problem``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from serving.frontdoor import FrontDoorLimits

logger = logging.getLogger(__name__)

MAX_ROWS = 10_000
MAX_CONCURRENCY = 16
RETRY_AFTER_S = 1
MAX_BODY_BYTES = FrontDoorLimits().max_body_bytes
# What a Parquet body may decode to, dictionaries expanded (a request of MAX_ROWS rows
# of a few hundred numbers is a few MB).
MAX_DECODED_BYTES = 64 * 1024 * 1024
# A body this large is checked on a thread, so the event loop keeps answering.
INLINE_CHECK_BYTES = 64 * 1024
FORMATS = ("dataframe_split", "dataframe_records", "instances", "inputs")
CSV, JSON, PARQUET = "text/csv", "application/json", "application/vnd.apache.parquet"
_SHAPE_HINT = "send a JSON object with one of dataframe_split, dataframe_records, instances, inputs"
# Fixed messages for error answers that are not Stageflow's own, by status.
_REPLACED = {
    400: ("BAD_REQUEST", "unreadable_body", "the model server could not read the request: "),
    415: ("UNSUPPORTED_MEDIA_TYPE", "unsupported_media_type", "send Content-Type "),
    504: ("TIMEOUT", "timeout", "the prediction took longer than the model server allows"),
}


class Refusal(Exception):
    """A request refused before the model sees it: its status and stable JSON body."""

    def __init__(self, status: int, error_code: str, problem: str, message: str):
        super().__init__(message)
        self.status = status
        self.body = {"error_code": error_code, "message": message, "problem": problem}

    def payload(self) -> bytes:
        return json.dumps(self.body).encode()


def count_rows(body: bytes, content_type: str | None, max_rows: int = MAX_ROWS) -> int:
    """The rows ``body`` holds, read no further than needed to count them.

    Raises:
        Refusal: 400 for a body that is not of its content type or not of a request's
            shape; 413 for more than ``max_rows`` rows or a Parquet file that decodes
            to more than ``MAX_DECODED_BYTES``.
    """
    kind = (content_type or "").split(";", 1)[0].strip().lower()
    if kind == CSV:
        lines = body.count(b"\n") + (0 if body.endswith(b"\n") or not body else 1)
        rows = max(0, lines - 1)  # the header; a quoted newline counts as a row (an upper bound)
    elif kind == PARQUET:
        rows = _parquet_rows(body, max_rows)
    else:  # JSON, and what MLflow then refuses by its content type
        rows = _json_rows(body) if kind == JSON else 0
    if rows > max_rows:
        raise _too_many(rows, max_rows)
    return rows


def _too_many(rows: int, max_rows: int) -> Refusal:
    return Refusal(
        413,
        "TOO_MANY_ROWS",
        "too_many_rows",
        f"{rows} rows in one request; a replica answers at most {max_rows} per request "
        "(stageflow serve --max-rows): score large sets with `stageflow score`, or send "
        "fewer rows per request",
    )


def _json_rows(body: bytes) -> int:
    try:
        data = json.loads(body)
    except RecursionError:
        raise Refusal(
            400,
            "BAD_REQUEST",
            "too_deeply_nested",
            f"the JSON body nests too deeply; {_SHAPE_HINT}",
        ) from None
    except UnicodeDecodeError:
        raise Refusal(400, "BAD_REQUEST", "not_json", "the body is not UTF-8 text") from None
    except ValueError as exc:  # JSONDecodeError: where, never what
        where = (
            f" ({exc.msg} at line {exc.lineno} column {exc.colno})" if hasattr(exc, "msg") else ""
        )
        raise Refusal(400, "BAD_REQUEST", "not_json", f"the body is not JSON{where}") from None
    formats = [key for key in FORMATS if isinstance(data, dict) and key in data]
    if len(formats) != 1:
        raise Refusal(400, "BAD_REQUEST", "wrong_shape", f"{_SHAPE_HINT} (exactly one)")
    value = data[formats[0]]
    if formats[0] == "dataframe_split":
        value = value.get("data") if isinstance(value, dict) else None
    if isinstance(value, list):
        return len(value)
    if isinstance(value, dict):  # a dict of columns
        return max((len(v) if isinstance(v, list) else 1 for v in value.values()), default=0)
    return 1


def _parquet_rows(body: bytes, max_rows: int) -> int:
    try:
        file = pq.ParquetFile(pa.BufferReader(body))
        meta, schema = file.metadata, file.schema_arrow
    except (pa.ArrowException, OSError, ValueError):
        raise Refusal(400, "BAD_REQUEST", "not_parquet", "the body is not a Parquet file") from None
    if meta.num_rows > max_rows:
        raise _too_many(meta.num_rows, max_rows)
    nested = [f.name for f in schema if pa.types.is_nested(f.type)]
    if nested:
        raise Refusal(
            400,
            "BAD_REQUEST",
            "nested_column",
            f"column {shorten(nested[0])!r} holds nested values; send one value per cell",
        )
    decoded = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    if decoded <= MAX_DECODED_BYTES:
        decoded += _expanded_dictionaries(body, meta)
    if decoded > MAX_DECODED_BYTES:
        raise Refusal(
            413,
            "REQUEST_TOO_LARGE",
            "decodes_too_large",
            f"the Parquet body decodes to more than {MAX_DECODED_BYTES // 2**20} MiB; "
            "score large sets with `stageflow score`",
        )
    return meta.num_rows


def _expanded_dictionaries(body: bytes, meta: pq.FileMetaData) -> int:
    """The bytes dictionary-encoded text columns take once each row holds its own value.

    A dictionary page of one long value repeated on every row is a few bytes in the
    file and rows × length in memory once decoded; the footer does not say which.
    Those columns are read here as dictionaries (bounded by the footer's sizes).
    """
    columns = {
        meta.row_group(g).column(c).path_in_schema
        for g in range(meta.num_row_groups)
        for c in range(meta.num_columns)
        if meta.row_group(g).column(c).physical_type == "BYTE_ARRAY"
        and any("DICTIONARY" in e for e in meta.row_group(g).column(c).encodings)
    }
    if not columns:
        return 0
    try:
        table = pq.ParquetFile(pa.BufferReader(body), read_dictionary=sorted(columns)).read(
            columns=sorted(columns), use_threads=False
        )
    except (pa.ArrowException, OSError, ValueError):
        raise Refusal(400, "BAD_REQUEST", "not_parquet", "the Parquet body is unreadable") from None
    total = 0
    for column in table.columns:
        for chunk in column.chunks:
            if isinstance(chunk, pa.DictionaryArray) and len(chunk):
                lengths = pc.take(pc.binary_length(chunk.dictionary), chunk.indices)
                total += int(pc.sum(lengths).as_py() or 0)
    return total


def shorten(name: object, limit: int = 64) -> str:
    """A client-given name as an answer may quote it: at most ``limit`` characters."""
    text = str(name)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_stageflow_error(payload: bytes) -> bool:
    """Whether an error answer's body is already Stageflow's own shape (the guarded model's)."""
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        return False
    return isinstance(body, dict) and all(
        isinstance(body.get(key), str) for key in ("error_code", "message", "problem")
    )


def replacement(status: int) -> bytes:
    """The fixed body answered instead of an error answer that is not Stageflow's own."""
    code, problem, message = _REPLACED.get(
        status, ("INTERNAL_ERROR", "internal_error", "the model server failed on this request")
    )
    if status == 400:
        message += f"{_SHAPE_HINT}, or CSV or Parquet with named columns"
    elif status == 415:
        message += f"{JSON}, {CSV} or {PARQUET} (charset utf-8 only)"
    return json.dumps({"error_code": code, "message": message, "problem": problem}).encode()


class Admission:
    """ASGI middleware for ``/invocations``: the limits and the error shape above."""

    def __init__(self, app, max_rows: int = MAX_ROWS, max_concurrency: int = MAX_CONCURRENCY):
        self.app = app
        self.max_rows, self.max_concurrency = max_rows, max_concurrency
        self.in_flight = 0  # one event loop: no lock needed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/invocations":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrency:
            await _answer(
                send, _busy(self.max_concurrency), [(b"retry-after", b"%d" % RETRY_AFTER_S)]
            )
            return
        self.in_flight += 1
        started = [False]

        async def send_tracked(message):
            started[0] = started[0] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._admit(scope, receive, send_tracked)
        except Refusal as refusal:
            await _answer(send_tracked, refusal)
        except Exception as exc:  # noqa: BLE001 - one line in the log, never a traceback
            where = exc.__traceback__
            while where is not None and where.tb_next is not None:
                where = where.tb_next
            frame = where.tb_frame.f_code if where is not None else None
            logger.error(
                "stageflow serve: /invocations failed with %s at %s:%s",
                type(exc).__name__,
                os.path.basename(frame.co_filename) if frame else "?",
                where.tb_lineno if where is not None else "?",
            )
            if not started[0]:
                await _answer(send_tracked, status=500, payload=replacement(500))
        finally:
            self.in_flight -= 1

    async def _admit(self, scope, receive, send):
        body = await _read_body(receive)
        content_type = None
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value.decode("latin-1")
        if content_type is None:
            shape = json.loads(replacement(415))
            raise Refusal(415, shape["error_code"], shape["problem"], shape["message"])
        if len(body) > INLINE_CHECK_BYTES:
            await asyncio.to_thread(count_rows, body, content_type, self.max_rows)
        else:
            count_rows(body, content_type, self.max_rows)
        await self.app(scope, _replay(body, receive), _error_shape(send))


def _busy(limit: int) -> Refusal:
    return Refusal(
        503,
        "SERVICE_UNAVAILABLE",
        "busy",
        f"this model server is answering its limit of {limit} requests at once "
        "(stageflow serve --max-concurrency); retry after a second",
    )


async def _read_body(receive) -> bytes:
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Refusal(400, "BAD_REQUEST", "disconnected", "the client left mid-request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise Refusal(
                413,
                "REQUEST_TOO_LARGE",
                "body_too_large",
                f"request body over the limit of {MAX_BODY_BYTES} bytes; send fewer rows "
                "per request",
            )
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """``receive`` that hands the app the body already read, then the connection's own."""
    sent = [False]

    async def replayed():
        if sent[0]:
            return await receive()  # after the body: the client leaving, as it happens
        sent[0] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed

    return receive


def _error_shape(send):
    """``send`` that holds an error answer and replaces it unless it is Stageflow's own."""
    held: dict = {}

    async def send_shaped(message):
        if message["type"] == "http.response.start" and message["status"] >= 400:
            held["start"], held["body"] = message, []
            return
        if "start" not in held or message["type"] != "http.response.body":
            await send(message)
            return
        held["body"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        start, payload = held.pop("start"), b"".join(held.pop("body"))
        if is_stageflow_error(payload):
            await send(start)
            await send({"type": "http.response.body", "body": payload})
            return
        await _answer(
            send, status=start["status"], payload=replacement(start["status"]), start=start
        )

    return send_shaped


async def _answer(
    send, refusal: Refusal | None = None, extra=(), *, status=0, payload=b"", start=None
):
    if refusal is not None:
        status, payload = refusal.status, refusal.payload()
    kept = [
        (k, v)
        for k, v in (start or {}).get("headers", ())
        if k.lower() not in (b"content-length", b"content-type")
    ]
    headers = [
        *kept,
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(payload)),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
