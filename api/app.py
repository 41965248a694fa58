"""The Flask application factory and its routes."""

from __future__ import annotations

import logging
import time

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request
from flask.typing import ResponseReturnValue
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from api import inference, metrics, openapi, v2
from api.fastpath import RAW_TYPES, PredictFastPath
from api.inference import EXTENSION
from api.inference import queue as _queue
from api.inference import settings as _settings
from api.queue import QueueClient
from common.config import Settings
from common.errors import (
    BadRequest,
    RedbatchError,
    UnsupportedMediaType,
)

logger = logging.getLogger(__name__)

MEASURED = ("redbatch.predict", "v2.infer")  # endpoints counted in redbatch_requests_total, by model

bp = Blueprint("redbatch", __name__)


def create_app(settings: Settings | None = None) -> Flask:
    """Build the app; the Redis client is made here, after gunicorn forks, and kept in extensions."""
    settings = settings or Settings.from_env()
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["MAX_FORM_MEMORY_SIZE"] = settings.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    queue, served = QueueClient(settings), set[str]()
    app.extensions[EXTENSION] = {"settings": settings, "queue": queue, "served": served}
    # The common predict request skips Flask (api/fastpath.py); the rest reaches the routes below.
    app.wsgi_app = PredictFastPath(app.wsgi_app, settings, queue, served)  # type: ignore[method-assign]
    app.register_blueprint(bp)
    app.register_blueprint(v2.bp)
    app.before_request(_start_timer)  # first: it must run even when the API key check refuses
    app.after_request(_record)
    app.teardown_request(_stop_timer)
    if settings.api_key_list:
        app.before_request(_require_api_key)
    app.register_error_handler(RedbatchError, _on_error)
    app.register_error_handler(HTTPException, _on_http_error)
    app.register_error_handler(Exception, _on_bug)
    return app


@bp.post("/v1/models/<model>/predict")
def predict(model: str) -> ResponseReturnValue:
    """What ``api/fastpath.py`` hands on: multipart uploads, bodies without a Content-Length, other
    content types (415). The same function answers there, without Flask."""

    def served() -> None:
        g.redbatch_served = True  # a bounded metric label: only names a live worker served

    args = (request.args.get("topk"), request.headers.get("X-Priority"), request.headers.get("X-Request-Timeout-Ms"))
    answer, timing = inference.predict_v1(_queue(), _settings(), model, _image_body, *args, served)
    resp = jsonify(answer)
    resp.headers["Server-Timing"] = timing
    return resp


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


@bp.get("/openapi.json")
def openapi_document() -> ResponseReturnValue:
    return jsonify(openapi.DOCUMENT)


@bp.get("/metrics")
def prometheus_metrics() -> ResponseReturnValue:
    body, content_type = metrics.render()
    return Response(body, content_type=content_type)


def _start_timer() -> None:
    if request.endpoint in MEASURED:
        g.redbatch_t0 = time.perf_counter()
        metrics.IN_PROGRESS.inc()


def _record(resp: Response) -> Response:
    """Count a measured request by model and status; a model label only for names a worker served."""
    t0 = g.get("redbatch_t0")
    if t0 is not None:
        model = (request.view_args or {}).get("model", "")
        served: set[str] = current_app.extensions[EXTENSION]["served"]
        label = metrics.label(served, model, bool(g.get("redbatch_served")))
        metrics.observe(label, resp.status_code, g.get("redbatch_error"), time.perf_counter() - t0)
    return resp


def _stop_timer(_exc: BaseException | None) -> None:
    if g.get("redbatch_t0") is not None:
        metrics.IN_PROGRESS.dec()


def _require_api_key() -> None:
    inference.check_api_key(request.path, request.headers.get("Authorization"), _settings().api_key_list)


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
    g.redbatch_error = exc.code
    if exc.status >= 500:
        logger.warning("%s: %s", exc.code, exc.message)
    resp = jsonify(error=exc.to_wire())
    resp.status_code = exc.status
    resp.headers.extend(inference.error_headers(exc.status))
    return resp


def _on_http_error(exc: HTTPException) -> ResponseReturnValue:
    if isinstance(exc, RequestEntityTooLarge):
        return _on_error(inference.body_too_large(_settings().max_body_bytes))
    code = (exc.name or "error").lower().replace(" ", "_")
    resp = jsonify(error={"code": code, "message": exc.description or exc.name})
    resp.status_code = exc.code or 500
    if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
        resp.headers["Allow"] = ", ".join(exc.valid_methods)
    return resp


def _on_bug(exc: Exception) -> ResponseReturnValue:
    logger.exception("unhandled error")
    resp = jsonify(error={"code": "internal", "message": "internal error; the server log has details"})
    resp.status_code = 500
    return resp
