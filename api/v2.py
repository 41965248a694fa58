"""The Open Inference Protocol (KServe v2) over REST, beside the simple API, with the binary tensor
data extension, as ``tritonclient.http`` sends and reads it.

An image goes in as the request's one input tensor, either

- ``BYTES`` of shape [N] (or [N, 1]): N encoded images (JPEG, PNG or WebP). In the binary extension
  each element is a 4-byte little-endian length and its bytes; in JSON each element is a string,
  the image base64-encoded (a JSON string cannot carry raw bytes); or
- ``UINT8`` of the model's input shape, [H, W, 3] or [N, H, W, 3]: RGB pixels, HWC, exactly what the
  model takes (resized and center-cropped as its preset does; ``GET /v2/models/<m>`` gives the shape).

The N images become N frames, all queued before the first reply is awaited, so that they can share a
batch; they are answered in order. Outputs, all of them or those the request names in ``outputs``:
``scores`` FP32 [N, k], ``indices`` INT64 [N, k] and ``labels`` BYTES [N, k], k the request parameter
``topk`` (default 5); a model whose handler returns something else gets its result's fields as
tensors of the same kind. Errors are ``{"error": "<message>"}`` with the status of their
``RedbatchError``.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import json
import logging
import math
import struct
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from flask import Blueprint, Response, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, MethodNotAllowed, NotFound, RequestEntityTooLarge

from api import inference
from common.errors import (
    BadRequest,
    InferenceFailed,
    RedbatchError,
    Unavailable,
    UnsupportedMediaType,
)
from common.protocol import TensorData, now_ms

logger = logging.getLogger(__name__)

bp = Blueprint("v2", __name__, url_prefix="/v2")

HEADER_LENGTH = "Inference-Header-Content-Length"
EXTENSIONS = ("binary_tensor_data",)
MAX_IMAGES = 64  # per request; each becomes a frame of its own
OUTPUTS = {"scores": "FP32", "indices": "INT64", "labels": "BYTES"}  # what a classifier answers
_KINDS = {"f": "FP32", "i": "INT64", "u": "INT64", "b": "BOOL", "U": "BYTES"}  # numpy kind → v2 datatype
_WIRE = {"FP32": "<f4", "INT64": "<i8", "BOOL": "u1"}


def _version() -> str:
    try:
        return importlib.metadata.version("redbatch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


VERSION = _version()


@dataclass(frozen=True)
class InputTensor:
    """The request's one input: its JSON ``data``, or (binary extension) its ``raw`` bytes."""

    datatype: str
    shape: tuple[int, ...]
    data: Any = None
    raw: bytes | None = None


@bp.get("/health/live")
def live() -> ResponseReturnValue:
    return _empty()


@bp.get("/health/ready")
def ready() -> ResponseReturnValue:
    q = inference.queue()
    if not q.ping():
        raise Unavailable("Redis does not answer")
    if not q.models(fresh=True):
        raise Unavailable("no live worker serves a model")
    return _empty()


@bp.get("")
def server_metadata() -> ResponseReturnValue:
    return jsonify(name="redbatch", version=VERSION, extensions=list(EXTENSIONS))


@bp.get("/models/<model>")
def model_metadata(model: str) -> ResponseReturnValue:
    info = inference.queue().model(model)
    shape = [int(d) for d in info.spec.get("shape", ())]
    return jsonify(
        name=info.name,
        platform="pytorch",
        inputs=[
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "pixels", "datatype": "UINT8", "shape": [-1, *shape]},
        ],
        outputs=[{"name": name, "datatype": dt, "shape": [-1, -1]} for name, dt in OUTPUTS.items()],
        parameters={
            "live_workers": len(info.workers),
            "max_batch_size": info.max_batch_size,
            "devices": ",".join(sorted({w.device for w in info.workers})),
            "resize_size": int(info.spec.get("resize_size", 0)),
            "crop_size": int(info.spec.get("crop_size", 0)),
        },
    )


@bp.get("/models/<model>/ready")
def model_ready(model: str) -> ResponseReturnValue:
    inference.queue().model(model)  # ModelNotFound (404) unless a live worker serves it
    return _empty()


@bp.post("/models/<model>/infer")
def infer(model: str) -> ResponseReturnValue:
    settings = inference.settings()
    t0, received_ms = time.perf_counter(), now_ms()
    header, tail = _read_body()
    params = _object(header.get("parameters"), "parameters")
    topk = inference.parse_topk(params.get("topk"))
    priority = inference.parse_priority(params.get("priority", request.headers.get("X-Priority")))
    deadline_ms = _deadline_ms(received_ms, params.get("timeout"))
    binary_default = params.get("binary_data_output", False)
    wanted = _wanted_outputs(header.get("outputs"), binary_default)
    client_id = header.get("id")
    if client_id is not None and not isinstance(client_id, str):
        raise BadRequest("id must be a string")
    tensor = _one_input(header.get("inputs"), tail)
    info = inference.queue().model(model)
    g.redbatch_served = True  # for the API's metrics, as in /v1's predict
    images = _images(tensor, info.spec, settings.max_image_pixels)
    reqs = [inference.new_request(model, deadline_ms, t, topk, priority) for t in images]
    t_sent = time.perf_counter()
    replies = inference.call_all(reqs, priority)
    waited_s = time.perf_counter() - t_sent
    results = [r.result or {} for r in replies]
    meta = {k: max(r.meta.get(k) or 0 for r in replies) for k in ("batch_size", "queue_ms", "infer_ms")}
    body = {"model_name": model, "id": client_id or reqs[0].id, "parameters": meta}
    tensors = _tensors(results)
    resp = _respond(body, tensors, wanted or [(name, binary_default) for name in tensors])
    # As /v1's: the API's own part, then the wait for the replies split by the slowest image's parts.
    api_ms = (time.perf_counter() - t0 - waited_s) * 1000.0
    worker = inference.slowest_parts([r.meta for r in replies])
    resp.headers["Server-Timing"] = inference.server_timing(worker, api_ms, waited_s * 1000.0)
    return resp


# ---- the request ------------------------------------------------------------------------------


def _read_body() -> tuple[dict[str, Any], bytes]:
    """The JSON inference header and the binary data after it (``Inference-Header-Content-Length``)."""
    encoding = (request.content_encoding or "identity").lower()
    if encoding != "identity":
        raise UnsupportedMediaType(f"Content-Encoding {encoding[:20]!r} is not supported: send the body uncompressed")
    body = request.get_data(cache=False)
    raw_length = request.headers.get(HEADER_LENGTH)
    length = len(body)
    if raw_length is not None:
        length = _parse_int(raw_length, HEADER_LENGTH)
        if not 0 <= length <= len(body):
            raise BadRequest(f"{HEADER_LENGTH} must be from 0 to the body's length {len(body)}, not {length}")
    try:
        header = json.loads(body[:length])
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the inference request is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(header, dict):
        raise BadRequest("the inference request must be a JSON object")
    return header, body[length:]


def _one_input(inputs: Any, tail: bytes) -> InputTensor:
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise BadRequest("inputs must hold exactly one tensor: BYTES (encoded images) or UINT8 (pixels)")
    t = inputs[0]
    datatype, shape = t.get("datatype"), t.get("shape")
    if not isinstance(datatype, str):
        raise BadRequest("the input has no datatype")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise BadRequest("the input's shape must be a list of non-negative integers")
    params = _object(t.get("parameters"), "the input's parameters")
    if "shared_memory_region" in params:
        raise BadRequest("shared memory is not supported: send the tensor in the request")
    size = params.get("binary_data_size")
    if size is None:
        if tail:
            raise BadRequest(f"{len(tail)} bytes follow the JSON, but the input has no binary_data_size")
        if "data" not in t:
            raise BadRequest("the input has neither data nor parameters.binary_data_size")
        return InputTensor(datatype, tuple(shape), data=t["data"])
    if "data" in t:
        raise BadRequest("the input has both data and parameters.binary_data_size")
    if not _is_int(size) or size != len(tail):
        raise BadRequest(f"binary_data_size must equal the {len(tail)} bytes that follow the JSON, not {size!r}")
    return InputTensor(datatype, tuple(shape), raw=tail)


def _images(t: InputTensor, spec: dict[str, Any], max_pixels: int) -> list[TensorData]:
    """One frame input per image; raises BadRequest, InvalidImage or PayloadTooLarge."""
    shape = tuple(int(d) for d in spec.get("shape", ()))
    if t.datatype == "BYTES":
        return [inference.model_input(b, spec, max_pixels) for b in _encoded_images(t)]
    if t.datatype == "UINT8":
        return _pixels(t, shape)
    raise BadRequest(
        f"datatype {t.datatype[:20]!r} is not accepted: send BYTES (encoded images) or UINT8 pixels {list(shape)}"
    )


def _encoded_images(t: InputTensor) -> list[bytes]:
    if len(t.shape) not in (1, 2) or (len(t.shape) == 2 and t.shape[1] != 1):
        raise BadRequest(f"a BYTES input has shape [N] for N encoded images, not {list(t.shape)}")
    n = _image_count(t.shape[0])
    items = _split_bytes(t.raw) if t.raw is not None else _flatten(t.data, len(t.shape))
    if len(items) != n:
        raise BadRequest(f"shape {list(t.shape)} needs {n} elements, the data has {len(items)}")
    return items if t.raw is not None else [_base64(s) for s in items]


def _pixels(t: InputTensor, shape: tuple[int, ...]) -> list[TensorData]:
    if t.shape == shape:
        n = 1
    elif len(t.shape) == len(shape) + 1 and t.shape[1:] == shape:
        n = _image_count(t.shape[0])
    else:
        raise BadRequest(
            f"a UINT8 input has the model's input shape {list(shape)} or [N, {', '.join(map(str, shape))}] "
            f"(RGB, HWC, resized and center-cropped as the model's preset does), not {list(t.shape)}"
        )
    size = math.prod(shape)
    raw = t.raw if t.raw is not None else _uint8_from_json(t.data, n * size)
    if len(raw) != n * size:
        raise BadRequest(f"shape {list(t.shape)} of UINT8 needs {n * size} bytes, the binary data has {len(raw)}")
    return [TensorData("uint8", shape, raw[i * size : (i + 1) * size]) for i in range(n)]


def _uint8_from_json(data: Any, count: int) -> bytes:
    why = f"UINT8 data must be a list of {count} integers from 0 to 255, flat or nested"
    if not isinstance(data, list):
        raise BadRequest(why)
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(why) from None
    if arr.dtype.kind not in "iu" or arr.size != count or (arr.size and (arr.min() < 0 or arr.max() > 255)):
        raise BadRequest(why)
    return arr.astype(np.uint8).tobytes()


def _split_bytes(raw: bytes) -> list[bytes]:
    """A BYTES tensor in the binary extension: each element a 4-byte little-endian length, then its bytes."""
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise BadRequest("the BYTES data is truncated: each element is a 4-byte length and its bytes")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise BadRequest("the BYTES data is truncated: each element is a 4-byte length and its bytes")
        out.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return out


def _flatten(data: Any, depth: int) -> list[Any]:
    """Row-major elements of ``data``, a list nested at most ``depth`` deep (v2 allows flat or nested)."""
    if not isinstance(data, list):
        raise BadRequest("the input's data must be a list")
    out: list[Any] = []
    for x in data:
        if isinstance(x, list) and depth > 1:
            out.extend(_flatten(x, depth - 1))
        else:
            out.append(x)
    return out


def _base64(s: Any) -> bytes:
    try:
        if not isinstance(s, str):
            raise ValueError
        return base64.b64decode(s, validate=True)
    except (ValueError, binascii.Error):
        raise BadRequest("in JSON, each BYTES element is a string: an encoded image in base64") from None


def _image_count(n: int) -> int:
    if not 1 <= n <= MAX_IMAGES:
        raise BadRequest(f"send from 1 to {MAX_IMAGES} images in one request, not {n}")
    return n


def _deadline_ms(received_ms: int, timeout_us: Any) -> int:
    """The deadline of ``inference.deadline_ms``, shortened by the v2 parameter ``timeout`` (microseconds)."""
    deadline = inference.deadline_ms(received_ms)
    if timeout_us is None:
        return deadline
    if not _is_int(timeout_us) or timeout_us < 1:
        raise BadRequest("the parameter timeout must be a positive integer of microseconds")
    limit_ms: int = -(-timeout_us // 1000)  # rounded up; integers only, however large
    return min(deadline, received_ms + limit_ms)


def _wanted_outputs(outputs: Any, binary_default: Any) -> list[tuple[str, bool]] | None:
    """(name, binary) of each requested output, or None for all of them, each ``binary_default``."""
    if not isinstance(binary_default, bool):
        raise BadRequest("the parameter binary_data_output must be true or false")
    if outputs is None or outputs == []:
        return None
    if not isinstance(outputs, list):
        raise BadRequest("outputs must be a list")
    wanted = []
    for o in outputs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise BadRequest("each requested output is an object with a name")
        params = _object(o.get("parameters"), "an output's parameters")
        if "classification" in params:
            raise BadRequest("the classification extension is not supported: the outputs are the top k already")
        if "shared_memory_region" in params:
            raise BadRequest("shared memory is not supported: outputs come back in the response")
        binary = params.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise BadRequest("an output's binary_data must be true or false")
        wanted.append((o["name"], binary))
    return wanted


def _object(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return value


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _parse_int(raw: str, what: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{what} must be an integer, not {raw[:20]!r}") from None


# ---- the response -----------------------------------------------------------------------------


def _tensors(results: list[dict[str, Any]]) -> dict[str, tuple[str, np.ndarray]]:
    """The workers' per-image results as output tensors [N, ...], classifier outputs first.

    Integers become INT64, other numbers FP32, strings BYTES, booleans BOOL; a result that is no
    tensor (ragged, or of another type) is the model's fault: ``InferenceFailed``.
    """
    names = [n for n in OUTPUTS if n in results[0]] + [n for n in results[0] if n not in OUTPUTS]
    out = {}
    for name in names:
        try:
            arr = np.asarray([r[name] for r in results])
        except (KeyError, ValueError, TypeError):
            raise InferenceFailed(f"the model's results have no common tensor {name!r}") from None
        datatype = _KINDS.get(arr.dtype.kind)
        if datatype is None:
            raise InferenceFailed(f"the model's result {name!r} is not a tensor of numbers or strings")
        out[name] = (datatype, arr)
    return out


def _respond(
    body: dict[str, Any], tensors: dict[str, tuple[str, np.ndarray]], wanted: list[tuple[str, bool]]
) -> Response:
    """The v2 response: JSON alone, or (any output in binary) the JSON then each binary output's bytes."""
    unknown = [name for name, _ in wanted if name not in tensors]
    if unknown:
        raise BadRequest(f"unknown output {unknown[0][:40]!r}: the model has {', '.join(tensors)}")
    outputs, blobs = [], []
    for name, binary in wanted:
        datatype, arr = tensors[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if binary:
            blob = _to_bytes(datatype, arr)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = arr.astype(np.float32).ravel().tolist() if datatype == "FP32" else arr.ravel().tolist()
        outputs.append(entry)
    body = {**body, "outputs": outputs}
    if not blobs:
        return jsonify(body)
    head = json.dumps(body, separators=(",", ":")).encode()
    resp = Response(head + b"".join(blobs), content_type="application/octet-stream")
    resp.headers[HEADER_LENGTH] = str(len(head))
    return resp


def _to_bytes(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        encoded = [str(s).encode() for s in arr.ravel()]
        return b"".join(struct.pack("<I", len(e)) + e for e in encoded)
    return arr.astype(_WIRE[datatype]).tobytes()


def _empty() -> Response:
    return Response(b"", 200, content_type="text/plain")


# ---- errors: {"error": "<message>"}, for the routes above and for unknown paths under /v2 -------


@bp.errorhandler(RedbatchError)
def _on_error(exc: RedbatchError) -> Response:
    g.redbatch_error = exc.code
    if exc.status >= 500:
        logger.warning("%s: %s", exc.code, exc.message)
    return _error(exc.message, exc.status)


@bp.errorhandler(HTTPException)
def _on_http_error(exc: HTTPException) -> Response:
    if isinstance(exc, RequestEntityTooLarge):
        return _on_error(inference.body_too_large(inference.settings().max_body_bytes))
    resp = _error(exc.description or exc.name, exc.code or 500)
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        resp.headers["Allow"] = ", ".join(exc.valid_methods)
    return resp


@bp.errorhandler(Exception)
def _on_bug(exc: Exception) -> Response:
    logger.exception("unhandled error")
    return _error("internal error; the server log has details", 500)


@bp.before_app_request
def _routing_error() -> Response | None:
    """A path under /v2 that matches no route, or a wrong method, matches no blueprint either, so the
    handlers above would not see it: answer it here, in v2's shape."""
    exc = request.routing_exception
    if isinstance(exc, (NotFound, MethodNotAllowed)) and (request.path + "/").startswith("/v2/"):
        return _on_http_error(exc)
    return None


def _error(message: str, status: int) -> Response:
    resp = jsonify(error=message)
    resp.status_code = status
    resp.headers.extend(inference.error_headers(status))
    return resp
