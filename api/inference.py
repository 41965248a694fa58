"""The request path both HTTP APIs (``/v1`` and the Open Inference Protocol's ``/v2``) share: the
app's resources, the deadline and ``topk`` of a request, an image turned into a frame's input, and
frames queued and awaited."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flask import current_app, request

from api.images import check_pixels, jpeg_frame, open_image, to_model_input
from api.queue import QueueClient
from common.config import Settings
from common.errors import BadRequest, PayloadTooLarge, Unauthorized, error_from_wire
from common.protocol import Reply, Request, TensorData, new_request_id, now_ms
from common.queues import PRIORITIES

EXTENSION = "redbatch"
MAX_TOPK = 100
DEFAULT_TOPK = 5


def settings() -> Settings:
    s: Settings = current_app.extensions[EXTENSION]["settings"]
    return s


def queue() -> QueueClient:
    q: QueueClient = current_app.extensions[EXTENSION]["queue"]
    return q


def deadline_ms(received_ms: int) -> int:
    """The request's deadline: the configured timeout, or shorter if the client asks for it."""
    return deadline_from(received_ms, request.headers.get("X-Request-Timeout-Ms"), settings().request_timeout_s)


def deadline_from(received_ms: int, raw: str | None, timeout_s: float) -> int:
    """``deadline_ms`` from the header's value ``raw`` (None when absent) and the configured timeout."""
    limit_ms = int(timeout_s * 1000)
    if raw is None:
        return received_ms + limit_ms
    try:
        asked = int(raw)
    except ValueError:
        raise BadRequest(f"X-Request-Timeout-Ms must be a positive integer, not {raw[:20]!r}") from None
    if asked < 1:
        raise BadRequest("X-Request-Timeout-Ms must be a positive integer")
    return received_ms + min(asked, limit_ms)


def parse_topk(raw: object) -> int:
    """``topk`` from a query string (str) or a JSON parameter (int): 1 to MAX_TOPK, DEFAULT_TOPK when absent."""
    if raw is None:
        return DEFAULT_TOPK
    if isinstance(raw, bool) or not isinstance(raw, (str, int)):
        raise BadRequest(f"topk must be an integer from 1 to {MAX_TOPK}, not {str(raw)[:20]!r}")
    try:
        k = int(raw)
    except ValueError:
        raise BadRequest(f"topk must be an integer from 1 to {MAX_TOPK}, not {str(raw)[:20]!r}") from None
    if not 1 <= k <= MAX_TOPK:
        raise BadRequest(f"topk must be an integer from 1 to {MAX_TOPK}, not {k}")
    return k


def model_input(body: bytes, spec: dict[str, Any], max_pixels: int) -> TensorData:
    """An encoded image as a model of ``spec`` takes it: the JPEG itself when every worker of the model
    decodes JPEGs on its device, else the resized and cropped uint8 pixels (``to_model_input``).

    Raises ``InvalidImage`` or ``PayloadTooLarge``.
    """
    as_jpeg = TensorData("jpeg", (len(body),), body)  # the worker decodes it, batched on its GPU
    decodes = "jpeg" in spec.get("accepts", ())
    frame = jpeg_frame(body) if decodes else None  # a plain JPEG's size without Pillow
    if frame is not None:
        check_pixels(frame[0], frame[1], max_pixels)
        return as_jpeg
    im = open_image(body, max_pixels)  # Pillow opens anything else
    if decodes and im.format == "JPEG" and im.mode in ("RGB", "L"):
        return as_jpeg
    return to_model_input(im, spec, max_pixels)


def new_request(model: str, deadline_ms: int, tensor: TensorData, topk: int, priority: str) -> Request:
    """A request frame for one input; the priority travels in it so a recovered frame keeps it."""
    return Request(
        id=new_request_id(),
        model=model,
        deadline_ms=deadline_ms,
        input=tensor,
        params={"topk": topk, "priority": priority},
        sent_ms=now_ms(),
    )


def parse_priority(raw: object) -> str:
    """``high | normal | low`` (any case; default normal), or a Triton-style integer: 0 is the
    default, 1 the highest, 2 and above lower. Raises ``BadRequest``."""
    if raw is None:
        return "normal"
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return "normal" if raw == 0 else "high" if raw == 1 else "low"
    value = raw.strip().lower() if isinstance(raw, str) else ""
    if value not in PRIORITIES:
        raise BadRequest(f"priority must be one of {', '.join(PRIORITIES)}, not {str(raw)[:20]!r}")
    return value


def predict_v1(
    q: QueueClient,
    s: Settings,
    model: str,
    body: Callable[[], bytes],
    topk: str | None,
    priority: str | None,
    timeout_ms: str | None,
    on_served: Callable[[], object],
) -> tuple[dict[str, Any], str]:
    """``POST /v1/models/<model>/predict`` without its HTTP layer: the query's ``topk``, the
    ``X-Priority`` and ``X-Request-Timeout-Ms`` headers as given (None when absent), the body read
    when it is due (its errors come after the parameters' and before the model's), ``on_served``
    called once a live worker is known to serve ``model``. The answer's fields, in order, and its
    ``Server-Timing`` header (``server_timing``); raises a ``RedbatchError`` for the client. Both
    the WSGI fast path and the Flask route run this."""
    t0 = time.perf_counter()
    received_ms = now_ms()
    deadline = deadline_from(received_ms, timeout_ms, s.request_timeout_s)
    k = parse_topk(topk)
    level = parse_priority(priority)
    data = body()
    info = q.model(model)
    on_served()
    tensor = model_input(data, info.spec, s.max_image_pixels)
    req = new_request(model, deadline, tensor, k, level)
    t_sent = time.perf_counter()
    (reply,) = [_checked(r) for r in q.call_all([req], level)]
    waited_s = time.perf_counter() - t_sent
    assert reply.result is not None
    res = reply.result
    answer: dict[str, Any] = {"id": req.id, "model": model}
    if {"indices", "labels", "scores"} <= res.keys():  # a classifier
        answer["predictions"] = [
            {"index": i, "label": lab, "score": sc} for i, lab, sc in zip(res["indices"], res["labels"], res["scores"])
        ]
    else:  # a user's own handler: its result as it is (e.g. {"embedding": [...]})
        answer["outputs"] = res
    answer.update((f, reply.meta.get(f)) for f in ("batch_size", "queue_ms", "infer_ms"))
    return answer, server_timing(reply.meta, (time.perf_counter() - t0 - waited_s) * 1000.0, waited_s * 1000.0)


TIMED = (("prep", "prep_ms"), ("batch", "wait_ms"), ("infer", "infer_ms"))


def server_timing(meta: Mapping[str, Any], api_ms: float, waited_ms: float) -> str:
    """An answer's ``Server-Timing`` header: where its time went, in ms. ``api``: the API's own
    part (``api_ms``: checking, framing, answering); of the ``waited_ms`` for the reply, ``queue``:
    the part the worker did not hold it (the Redis hops both ways, and waiting in Redis behind
    other work), and the worker's (``meta``): ``prep`` from its take to its input ready (decoding
    it and those taken before it), ``batch`` waiting for its batch to form and a lane, ``infer``
    the pass. From a worker that does not time its part, ``api`` and ``wait`` (all of it)."""
    parts = [("api", api_ms)]
    if _timed(meta):
        worker = [(name, max(float(meta[k]), 0.0)) for name, k in TIMED]
        parts += [("queue", max(waited_ms - sum(ms for _, ms in worker), 0.0)), *worker]
    else:
        parts.append(("wait", waited_ms))
    return ", ".join(f"{name};dur={ms:.3f}" for name, ms in parts)


def slowest_parts(metas: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """The worker's parts of several replies (one /v2 request's images) for one header: each part
    the largest among them; none unless every reply timed them (the header then says ``wait``)."""
    if not metas or not all(map(_timed, metas)):
        return {}
    return {k: max(float(m[k]) for m in metas) for _, k in TIMED}


def _timed(meta: Mapping[str, Any]) -> bool:
    """Whether a reply's ``meta`` carries every one of the worker's parts as a number."""
    return all(isinstance(meta.get(k), (int, float)) for _, k in TIMED)


def body_too_large(max_body_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the body is larger than {max_body_bytes} bytes")


def error_headers(status: int) -> list[tuple[str, str]]:
    """What an error answer of ``status`` carries besides its body: when to retry (503), how to authenticate (401)."""
    if status == 503:
        return [("Retry-After", "1")]
    if status == 401:
        return [("WWW-Authenticate", 'Bearer realm="redbatch"')]
    return []


def check_api_key(path: str, header: str | None, keys: Sequence[str]) -> None:
    """With ``keys`` configured, every /v1 and /v2/models route needs ``Authorization: Bearer <key>``
    (``header``); probes (and v2's health and server metadata) do not. Raises ``Unauthorized``."""
    if not keys or not path.startswith(("/v1/", "/v2/models/")):
        return
    scheme, _, token = (header or "").partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, always: constant time in the key presented and in which one matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


def call_all(reqs: list[Request], priority: str = "normal") -> list[Reply]:
    """Queue every request, then await each reply in order; the successful replies, in order.

    All frames are queued, and the first reply awaited, in one Redis round trip, so the requests of
    one client call can share a batch without a thread each. Raises the first error in order:
    ``QueueFull``, ``Unavailable``, ``DeadlineExceeded``, or the error a worker reported. Frames
    already queued when an error is raised are still answered by a worker, and their replies
    expire unread.
    """
    return [_checked(reply) for reply in queue().call_all(reqs, priority)]


def _checked(reply: Reply) -> Reply:
    if not reply.ok:
        assert reply.error is not None
        raise error_from_wire(reply.error["code"], reply.error["message"])
    return reply
