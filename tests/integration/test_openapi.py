"""The OpenAPI document at /openapi.json, kept true by schemathesis: every operation of the Flask app
(through its WSGI interface) on a real Redis with a live worker, fuzzed with valid and invalid
input, each answer checked against the document."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
import schemathesis
import torch
from flask import Flask
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from api.openapi import DOCUMENT
from common.config import Settings
from tests.conftest import make_image
from tests.integration.conftest import RunningWorker, TinyHandler

# schemathesis' own strategies trip this deprecation of hypothesis; nothing here can act on it
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


class SoundHandler(TinyHandler):
    """TinyHandler without its poisoned input: here a 500 can only be the API's own fault."""

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        m = batch.mean(dim=(1, 2, 3))
        return torch.stack([-((m - 25.5 * c) ** 2) / 50 for c in range(10)], dim=1)


# Every model name is the live one, so that requests get past the lookup to the validation of their
# bodies (unknown models are tested in tests/e2e/test_v2.py). The document is the one the app serves
# (test_the_app_serves_this_document); it is loaded here, before any fixture exists, because
# schemathesis' fixture-based loader does not work with this pytest.
CONFIG = schemathesis.Config.from_dict({"parameters": {"model": "tiny"}, "generation": {"mode": "all"}})
schema = schemathesis.openapi.from_dict(DOCUMENT, config=CONFIG)


@pytest.fixture
def app(settings: Settings, start_worker: Callable[..., RunningWorker]) -> Flask:
    start_worker(SoundHandler())
    return create_app(settings.replace(model="tiny", request_timeout_s=5.0))


def test_the_app_serves_this_document(app: Flask) -> None:
    resp = app.test_client().get("/openapi.json")
    assert resp.status_code == 200 and resp.get_json() == json.loads(json.dumps(DOCUMENT))


@schema.parametrize()
@hypothesis_settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_is_documented(case: schemathesis.Case, app: Flask) -> None:
    resp = case.call(app=app)
    checks = CHECKS
    if resp.status_code == 504 and _asks_for_a_deadline(case):
        checks = [c for c in CHECKS if c is not not_a_server_error]  # a deadline of 1 ms: 504 is right
    case.validate_response(resp, checks=checks)


def _asks_for_a_deadline(case: schemathesis.Case) -> bool:
    headers = {k.lower() for k in case.headers or {}}
    params = case.body.get("parameters") if isinstance(case.body, dict) else None
    return "x-request-timeout-ms" in headers or (isinstance(params, dict) and "timeout" in params)


def test_successful_answers_match_the_document_too(app: Flask) -> None:
    """Generated bodies are almost never images: send real ones, on every inference route."""
    jpeg = make_image(3)
    cases = [
        schema["/v1/models/{model}/predict"]["POST"].Case(
            path_parameters={"model": "tiny"}, query={"topk": 3}, body=jpeg, media_type="image/jpeg"
        ),
        schema["/v2/models/{model}/infer"]["POST"].Case(
            path_parameters={"model": "tiny"},
            body={
                "inputs": [
                    {"name": "image", "datatype": "BYTES", "shape": [2], "data": [base64.b64encode(jpeg).decode()] * 2}
                ],
                "parameters": {"topk": 3},
            },
            media_type="application/json",
        ),
        schema["/v2/models/{model}/infer"]["POST"].Case(
            path_parameters={"model": "tiny"},
            body={"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [8, 8, 3], "data": [9] * 192}]},
            media_type="application/json",
        ),
        schema["/v2/models/{model}/infer"]["POST"].Case(  # the answer in the binary extension
            path_parameters={"model": "tiny"},
            body={
                "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [8, 8, 3], "data": [9] * 192}],
                "parameters": {"binary_data_output": True},
            },
            media_type="application/json",
        ),
    ]
    for case in cases:
        resp = case.call_and_validate(app=app, checks=CHECKS)
        assert resp.status_code == 200, resp.text
