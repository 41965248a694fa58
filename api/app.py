"""The Flask application factory and its routes."""

from __future__ import annotations

import hmac
import logging

from flask import Blueprint, Flask, current_app, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from api.images import open_image, to_model_input
from api.queue import QueueClient
from common.config import Settings
from common.errors import (
    BadRequest,
    PayloadTooLarge,
    RedbatchError,
    Unauthorized,
    UnsupportedMediaType,
    error_from_wire,
)
from common.protocol import Request, TensorData, new_request_id, now_ms

logger = logging.getLogger(__name__)

MAX_TOPK = 100
RAW_TYPES = ("image/jpeg", "image/png", "image/webp", "application/octet-stream")
EXTENSION = "redbatch"

bp = Blueprint("redbatch", __name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; the Redis client is made here, after gunicorn forks, and kept in extensions."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = {"settings": settings, "queue": QueueClient(settings)}
    app.register_blueprint(bp)
    if settings.api_key_list:
        app.before_request(_require_api_key)
    app.register_error_handler(RedbatchError, _on_error)
    app.register_error_handler(HTTPException, _on_http_error)
    app.register_error_handler(Exception, _on_bug)
    return app


def _settings() -> Settings:
    s: Settings = current_app.extensions[EXTENSION]["settings"]
    return s


def _queue() -> QueueClient:
    q: QueueClient = current_app.extensions[EXTENSION]["queue"]
    return q


@bp.post("/v1/models/<model>/predict")
def predict(model: str) -> ResponseReturnValue:
    settings = _settings()
    received_ms = now_ms()
    deadline_ms = _deadline_ms(received_ms)
    topk = _topk(request.args.get("topk"))
    body = _image_body()
    info = _queue().model(model)
    im = open_image(body, settings.max_image_pixels)
    if im.format == "JPEG" and "jpeg" in info.spec.get("accepts", ()) and im.mode in ("RGB", "L"):
        tensor = TensorData("jpeg", (len(body),), body)  # the worker decodes it, batched on its GPU
    else:
        tensor = to_model_input(im, info.spec, settings.max_image_pixels)
    req = Request(
        id=new_request_id(),
        model=model,
        deadline_ms=deadline_ms,
        input=tensor,
        params={"topk": topk},
        sent_ms=now_ms(),
    )
    reply = _queue().call(req)
    if not reply.ok:
        assert reply.error is not None
        raise error_from_wire(reply.error["code"], reply.error["message"])
    assert reply.result is not None
    res = reply.result
    return jsonify(
        id=req.id,
        model=model,
        predictions=[
            {"index": i, "label": lab, "score": s} for i, lab, s in zip(res["indices"], res["labels"], res["scores"])
        ],
        batch_size=reply.meta.get("batch_size"),
        queue_ms=reply.meta.get("queue_ms"),
        infer_ms=reply.meta.get("infer_ms"),
    )


@bp.get("/v1/models")
def list_models() -> ResponseReturnValue:
    return jsonify(models=[m.to_json() for m in _queue().models().values()])


@bp.get("/healthz")
def healthz() -> ResponseReturnValue:
    return jsonify(status="ok")


@bp.get("/readyz")
def readyz() -> ResponseReturnValue:
    q = _queue()
    if not q.ping():
        return jsonify(status="unavailable", reason="Redis does not answer"), 503
    models = q.models(fresh=True)
    if not models:
        return jsonify(status="unavailable", reason="no live worker serves a model"), 503
    return jsonify(status="ready", models=sorted(models))


def _require_api_key() -> None:
    """With keys configured, every /v1 route needs ``Authorization: Bearer <key>``; probes do not."""
    if not request.path.startswith("/v1/"):
        return
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    presented = token.strip().encode() if scheme.lower() == "bearer" else b""
    # Compare against every key, always: constant time in the key presented and in which one matched.
    matched = False
    for key in _settings().api_key_list:
        matched |= hmac.compare_digest(presented, key.encode())
    if not matched:
        raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'")


def _deadline_ms(received_ms: int) -> int:
    """The request's deadline: the configured timeout, or shorter if the client asks for it."""
    limit_ms = int(_settings().request_timeout_s * 1000)
    raw = request.headers.get("X-Request-Timeout-Ms")
    if raw is None:
        return received_ms + limit_ms
    try:
        asked = int(raw)
    except ValueError:
        raise BadRequest(f"X-Request-Timeout-Ms must be a positive integer, not {raw[:20]!r}") from None
    if asked < 1:
        raise BadRequest("X-Request-Timeout-Ms must be a positive integer")
    return received_ms + min(asked, limit_ms)


def _topk(raw: str | None) -> int:
    if raw is None:
        return 5
    try:
        k = int(raw)
    except ValueError:
        raise BadRequest(f"topk must be an integer from 1 to {MAX_TOPK}, not {raw[:20]!r}") from None
    if not 1 <= k <= MAX_TOPK:
        raise BadRequest(f"topk must be an integer from 1 to {MAX_TOPK}, not {k}")
    return k


def _image_body() -> bytes:
    """The image bytes: the raw body (image/*) or the multipart field ``image``."""
    ctype = (request.mimetype or "").lower()
    if ctype == "multipart/form-data":
        f = request.files.get("image")
        if f is None:
            raise BadRequest("multipart request has no field named 'image'")
        data: bytes = f.read()
        return data
    if ctype in RAW_TYPES:
        return request.get_data(cache=False)
    shown = ctype or "none"
    raise UnsupportedMediaType(
        f"Content-Type {shown!r} is not accepted: send image/jpeg, image/png or image/webp, "
        "or multipart/form-data with a field 'image'"
    )


def _on_error(exc: RedbatchError) -> ResponseReturnValue:
    if exc.status >= 500:
        logger.warning("%s: %s", exc.code, exc.message)
    resp = jsonify(error=exc.to_wire())
    resp.status_code = exc.status
    if exc.status == 503:
        resp.headers["Retry-After"] = "1"
    if exc.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="redbatch"'
    return resp


def _on_http_error(exc: HTTPException) -> ResponseReturnValue:
    if isinstance(exc, RequestEntityTooLarge):
        return _on_error(PayloadTooLarge(f"the body is larger than {_settings().max_body_bytes} bytes"))
    code = (exc.name or "error").lower().replace(" ", "_")
    resp = jsonify(error={"code": code, "message": exc.description or exc.name})
    resp.status_code = exc.code or 500
    return resp


def _on_bug(exc: Exception) -> ResponseReturnValue:
    logger.exception("unhandled error")
    resp = jsonify(error={"code": "internal", "message": "internal error; the server log has details"})
    resp.status_code = 500
    return resp
