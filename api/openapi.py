"""The OpenAPI 3.1 document of the whole HTTP API (``GET /openapi.json``): the simple ``/v1`` API,
probes, metrics and the Open Inference Protocol's ``/v2``. ``tests/integration/test_openapi.py``
keeps it true with schemathesis against the app on a real Redis with a live worker."""

from __future__ import annotations

from typing import Any

from api.v2 import HEADER_LENGTH, MAX_IMAGES, VERSION

REASONS = {
    400: "Bad request: the message names the problem",
    401: "API keys are configured and the request has none, or a wrong one",
    404: "No live worker serves that model",
    413: "The body, or the image's pixel count, is over its limit",
    415: "A Content-Type (v1) or Content-Encoding (v2) that is not accepted",
    500: "The model raised on this input (the rest of its batch is answered normally)",
    503: "Redis does not answer, or the model's queue is full; retry after a second",
    504: "No reply before the request's deadline",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description, "content": {"application/json": {"schema": schema}}}
    if headers:
        out["headers"] = headers
    return out


def _errors(schema: str, *statuses: int) -> dict[str, Any]:
    out = {}
    for status in statuses:
        headers = {}
        if status == 503:
            headers["Retry-After"] = {"required": True, "schema": {"type": "string"}}
        if status == 401:
            headers["WWW-Authenticate"] = {"required": True, "schema": {"type": "string"}}
        out[str(status)] = _json(_ref(schema), REASONS[status], headers)
    return out


MODEL = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}, "example": "resnet18"}
TIMEOUT = {
    "name": "X-Request-Timeout-Ms",
    "in": "header",
    "required": False,
    "description": "Shortens the request's deadline (never beyond the server's request_timeout_s)",
    "schema": {"type": "integer", "minimum": 1},
}
PRIORITY = {
    "name": "X-Priority",
    "in": "header",
    "required": False,
    "schema": {"type": "string", "enum": ["high", "normal", "low"], "default": "normal"},
}
SERVER_TIMING = {
    "required": True,
    "description": "Where the request's time went, in ms: `api` (the API's own part), `queue` (the Redis hops and "
    "waiting in Redis), `prep` (the worker preparing its input), `batch` (waiting for its batch and a lane), "
    "`infer` (the pass); from a worker that does not time its part, `api` and `wait`",
    "schema": {
        "type": "string",
        "example": "api;dur=0.231, queue;dur=1.458, prep;dur=2.381, batch;dur=0.201, infer;dur=6.160",
    },
}
KEY: list[dict[str, list[str]]] = [{"bearer": []}, {}]  # only when REDBATCH_API_KEYS is set
BINARY = {"type": "string", "format": "binary"}
NULLABLE_INT = {"type": ["integer", "null"]}
NULLABLE_NUMBER = {"type": ["number", "null"]}

SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message"],
                "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
            }
        },
    },
    "V2Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Prediction": {
        "type": "object",
        "required": ["index", "label", "score"],
        "properties": {"index": {"type": "integer"}, "label": {"type": "string"}, "score": {"type": "number"}},
    },
    "PredictResponse": {
        "type": "object",
        "required": ["id", "model"],
        "description": "A classifier answers `predictions`; a model with a handler of its own, `outputs`",
        "properties": {
            "id": {"type": "string"},
            "model": {"type": "string"},
            "predictions": {"type": "array", "items": _ref("Prediction")},
            "outputs": {"type": "object"},
            "batch_size": NULLABLE_INT,
            "queue_ms": NULLABLE_NUMBER,
            "infer_ms": NULLABLE_NUMBER,
        },
    },
    "Model": {
        "type": "object",
        "required": ["name", "input", "max_batch_size", "live_workers"],
        "properties": {
            "name": {"type": "string"},
            "input": {"type": "object"},
            "accepts": {"type": "array", "items": {"type": "string"}},
            "max_batch_size": {"type": "integer"},
            "live_workers": {"type": "integer"},
            "devices": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Readiness": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["ready", "unavailable"]},
            "models": {"type": "array", "items": {"type": "string"}},
            "reason": {"type": "string"},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}, "description": "-1: any size"},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
            "parameters": _ref("Parameters"),  # live_workers, max_batch_size, devices, resize/crop size
        },
    },
    "Parameters": {
        "type": "object",
        "additionalProperties": {"type": ["boolean", "number", "string"]},
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "description": (
            "BYTES [N] or [N, 1]: N encoded images (JPEG, PNG, WebP), base64 strings in JSON; or UINT8 "
            "of the model's input shape [H, W, 3] or [N, H, W, 3] (RGB, HWC, already resized and "
            f"center-cropped). N is 1 to {MAX_IMAGES}. The data is in `data`, or after the JSON "
            "(binary extension: parameters.binary_data_size bytes)"
        ),
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": ["BYTES", "UINT8"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "parameters": {
                "type": "object",
                "properties": {"binary_data_size": {"type": "integer", "minimum": 0}},
            },
            "data": {"type": "array"},
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "parameters": {"type": "object", "properties": {"binary_data": {"type": "boolean"}}},
        },
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {
                "type": "object",
                "properties": {
                    "topk": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
                    "binary_data_output": {"type": "boolean", "default": False},
                    "timeout": {"type": "integer", "minimum": 1, "description": "deadline in microseconds"},
                },
            },
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string", "enum": ["FP32", "INT64", "BOOL", "BYTES"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "parameters": {"type": "object", "properties": {"binary_data_size": {"type": "integer"}}},
            "data": {"type": "array"},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
    },
}

_V2_OK = {"description": "True", "content": {}}


def _op(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": responses, **extra}


PATHS: dict[str, Any] = {
    "/v1/models/{model}/predict": {
        "post": _op(
            "Classify one image",
            {
                "200": _json(_ref("PredictResponse"), "The model's top k", {"Server-Timing": SERVER_TIMING}),
                **_errors("Error", 400, 401, 404, 413, 415, 500, 503, 504),
            },
            parameters=[
                MODEL,
                {
                    "name": "topk",
                    "in": "query",
                    "required": False,
                    "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 5},
                },
                TIMEOUT,
                PRIORITY,
            ],
            requestBody={
                "required": True,
                "content": {
                    **{t: {"schema": BINARY} for t in ("image/jpeg", "image/png", "image/webp")},
                    "application/octet-stream": {"schema": BINARY},
                    "multipart/form-data": {
                        "schema": {"type": "object", "required": ["image"], "properties": {"image": BINARY}}
                    },
                },
            },
            security=KEY,
        )
    },
    "/v1/models": {
        "get": _op(
            "Models that live workers serve",
            {
                "200": _json(
                    {
                        "type": "object",
                        "required": ["models"],
                        "properties": {"models": {"type": "array", "items": _ref("Model")}},
                    },
                    "The live models",
                ),
                **_errors("Error", 401, 503),
            },
            security=KEY,
        )
    },
    "/healthz": {
        "get": _op(
            "Liveness: the process answers",
            {"200": _json({"type": "object", "properties": {"status": {"const": "ok"}}}, "Alive")},
        )
    },
    "/readyz": {
        "get": _op(
            "Readiness: Redis answers and a live worker serves a model",
            {
                "200": _json(_ref("Readiness"), "Ready"),
                "503": _json(_ref("Readiness"), "Not ready: the reason says why"),
            },
        )
    },
    "/metrics": {
        "get": _op(
            "Prometheus metrics of every API process",
            {
                "200": {
                    "description": "Prometheus text format",
                    "content": {"text/plain": {"schema": {"type": "string"}}},
                }
            },
        )
    },
    "/openapi.json": {
        "get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}),
    },
    "/v2/health/live": {"get": _op("Open Inference Protocol: server live", {"200": _V2_OK})},
    "/v2/health/ready": {
        "get": _op("Open Inference Protocol: server ready", {"200": _V2_OK, **_errors("V2Error", 503)}),
    },
    "/v2": {"get": _op("Open Inference Protocol: server metadata", {"200": _json(_ref("ServerMetadata"), "Server")})},
    "/v2/models/{model}": {
        "get": _op(
            "Open Inference Protocol: model metadata",
            {"200": _json(_ref("ModelMetadata"), "Inputs and outputs"), **_errors("V2Error", 401, 404, 503)},
            parameters=[MODEL],
            security=KEY,
        )
    },
    "/v2/models/{model}/ready": {
        "get": _op(
            "Open Inference Protocol: model ready",
            {"200": _V2_OK, **_errors("V2Error", 401, 404, 503)},
            parameters=[MODEL],
            security=KEY,
        )
    },
    "/v2/models/{model}/infer": {
        "post": _op(
            "Open Inference Protocol: inference, JSON or with the binary tensor data extension",
            {
                "200": {
                    "description": (
                        f"The outputs; with any output in binary, the JSON ({HEADER_LENGTH} bytes) and then "
                        "each binary output's bytes, in order"
                    ),
                    "headers": {
                        HEADER_LENGTH: {"required": False, "schema": {"type": "integer", "minimum": 0}},
                        "Server-Timing": {
                            **SERVER_TIMING,
                            "description": f"{SERVER_TIMING['description']}; of several images, each of the "
                            "worker's parts is the largest among them",
                        },
                    },
                    "content": {
                        "application/json": {"schema": _ref("InferenceResponse")},
                        "application/octet-stream": {"schema": BINARY},
                    },
                },
                **_errors("V2Error", 400, 401, 404, 413, 415, 500, 503, 504),
            },
            parameters=[
                MODEL,
                {
                    "name": HEADER_LENGTH,
                    "in": "header",
                    "required": False,
                    "description": "Binary extension: the JSON's length; the tensors' bytes follow it",
                    "schema": {"type": "integer", "minimum": 0},
                },
                TIMEOUT,
            ],
            requestBody={
                "required": True,
                "content": {
                    "application/json": {"schema": _ref("InferenceRequest")},
                    "application/octet-stream": {"schema": BINARY},
                },
            },
            security=KEY,
        )
    },
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "redbatch",
        "version": VERSION,
        "description": (
            "Dynamic-batching inference for PyTorch image models. /v1 is the simple API; /v2 is the Open "
            "Inference Protocol (KServe v2) with the binary tensor data extension."
        ),
    },
    "paths": PATHS,
    "components": {
        "schemas": SCHEMAS,
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "Only when REDBATCH_API_KEYS is set: Authorization: Bearer <key>",
            }
        },
    },
}
