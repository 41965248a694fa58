"""Frames on the wire: msgpack maps with a schema version ``v``. The only place frames are encoded.

Request: ``{v, id, model, deadline_ms, sent_ms, input: {dtype, shape, data}, params: {...}}``
Reply:   ``{v, id, ok, result | error: {code, message}, meta: {worker, batch_size, queue_ms, infer_ms}}``
         (and from a worker that times them, ``prep_ms`` and ``wait_ms`` in ``meta``)

``deadline_ms`` and ``sent_ms`` are wall-clock milliseconds since the epoch: they cross machines.
The ``*_ms`` of ``meta`` but ``queue_ms`` are durations on the worker's own clock.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import msgpack

from common.errors import FrameError, RedbatchError

VERSION = 1
DTYPE_SIZES = {"uint8": 1, "float16": 2, "float32": 4, "jpeg": 1}  # "jpeg": encoded bytes, shape [len]
MAX_TENSOR_BYTES = 256 * 1024 * 1024
_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch (deadlines cross machines, so not monotonic)."""
    return time.time_ns() // 1_000_000


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class TensorData:
    """A dense array: row-major ``data`` of ``dtype`` with ``shape``."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}


@dataclass(frozen=True)
class Request:
    id: str
    model: str
    deadline_ms: int
    input: TensorData
    params: dict[str, Any] = field(default_factory=dict)
    sent_ms: int = 0

    def expired(self, at_ms: int | None = None) -> bool:
        return (now_ms() if at_ms is None else at_ms) >= self.deadline_ms


@dataclass(frozen=True)
class Reply:
    id: str
    ok: bool
    result: dict[str, Any] | None = None
    error: dict[str, str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def failure(cls, request_id: str, err: RedbatchError, meta: dict[str, Any] | None = None) -> Reply:
        return cls(id=request_id, ok=False, error=err.to_wire(), meta=meta or {})


def encode_request(req: Request) -> bytes:
    return _pack(
        {
            "v": VERSION,
            "id": req.id,
            "model": req.model,
            "deadline_ms": req.deadline_ms,
            "sent_ms": req.sent_ms,
            "input": req.input.to_wire(),
            "params": req.params,
        }
    )


def encode_reply(rep: Reply) -> bytes:
    body: dict[str, Any] = {"v": VERSION, "id": rep.id, "ok": rep.ok, "meta": rep.meta}
    if rep.ok:
        body["result"] = rep.result
    else:
        body["error"] = rep.error
    return _pack(body)


def decode_request(raw: bytes) -> Request:
    """Parse and validate a request frame.

    Raises ``FrameError``; its ``request_id`` is set whenever the frame carried a usable id, so the
    caller can still answer the client instead of leaving it to time out.
    """
    m = _unpack(raw)
    rid = _usable_id(m)
    _check_version(m, rid)
    try:
        model = m["model"]
        deadline_ms = m["deadline_ms"]
        sent_ms = m.get("sent_ms", 0)
        params = m.get("params", {})
        tensor = _decode_tensor(m["input"])
    except (KeyError, TypeError, ValueError) as exc:
        raise FrameError(f"malformed request frame: {exc}", rid) from None
    if not isinstance(model, str) or not isinstance(deadline_ms, int) or not isinstance(sent_ms, int):
        raise FrameError("malformed request frame: model, deadline_ms or sent_ms has the wrong type", rid)
    if not isinstance(params, dict):
        raise FrameError("malformed request frame: params must be a map", rid)
    assert rid is not None  # _check_version raised otherwise
    return Request(rid, model, deadline_ms, tensor, params, sent_ms)


def decode_reply(raw: bytes) -> Reply:
    """Parse a reply frame; raises ``FrameError`` when it is not one this version understands."""
    m = _unpack(raw)
    rid = _usable_id(m)
    _check_version(m, rid)
    assert rid is not None
    ok = m.get("ok")
    meta = m.get("meta") or {}
    if ok is True and isinstance(m.get("result"), dict) and isinstance(meta, dict):
        return Reply(rid, True, result=m["result"], meta=meta)
    err = m.get("error")
    if ok is False and isinstance(err, dict) and isinstance(err.get("code"), str) and isinstance(meta, dict):
        return Reply(rid, False, error={"code": err["code"], "message": str(err.get("message", ""))}, meta=meta)
    raise FrameError("malformed reply frame", rid)


def _decode_tensor(t: Any) -> TensorData:
    if not isinstance(t, dict):
        raise ValueError("input must be a map")
    dtype, shape, data = t["dtype"], t["shape"], t["data"]
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not shape or not all(isinstance(d, int) and d > 0 for d in shape):
        raise ValueError("shape must be a non-empty list of positive ints")
    if not isinstance(data, bytes):
        raise ValueError("data must be bytes")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if expected > MAX_TENSOR_BYTES or len(data) != expected:
        raise ValueError(f"data has {len(data)} bytes, shape {shape} of {dtype} needs {expected}")
    return TensorData(dtype, tuple(shape), data)


def _usable_id(m: dict[str, Any]) -> str | None:
    rid = m.get("id")
    return rid if isinstance(rid, str) and _ID_RE.match(rid) else None


def _check_version(m: dict[str, Any], rid: str | None) -> None:
    if m.get("v") != VERSION:
        raise FrameError(f"unknown frame version {m.get('v')!r} (this side speaks {VERSION})", rid)
    if rid is None:
        raise FrameError("frame has no usable id")


def _pack(obj: dict[str, Any]) -> bytes:
    out = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(out, bytes)
    return out


def _unpack(raw: bytes) -> dict[str, Any]:
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise FrameError(f"not a msgpack frame: {type(exc).__name__}") from None
    if not isinstance(m, dict):
        raise FrameError("frame is not a map")
    return m
