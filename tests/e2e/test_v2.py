"""The Open Inference Protocol (/v2) through gunicorn into a real worker, driven by the real
``tritonclient.http`` client (binary tensor data extension) and by plain JSON requests."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from api.images import open_image, to_model_input
from tests.conftest import make_image
from tests.e2e.conftest import ARCH, Service

pytestmark = pytest.mark.e2e
OUTPUTS = ("scores", "indices", "labels")


@pytest.fixture(scope="module")
def client(service: Service) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=service.url.removeprefix("http://"), network_timeout=60)
    yield c
    c.close()


def v1_top5(service: Service, image: bytes) -> list[dict[str, Any]]:
    resp = requests.post(
        service.predict_url() + "?topk=5", data=image, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    preds: list[dict[str, Any]] = resp.json()["predictions"]
    return preds


def assert_same_top5(v1: list[dict[str, Any]], scores: np.ndarray, indices: np.ndarray, labels: list[str]) -> None:
    assert indices.tolist() == [p["index"] for p in v1]
    assert labels == [p["label"] for p in v1]
    np.testing.assert_allclose(scores, [p["score"] for p in v1], rtol=0, atol=1e-5)


def pixels(service: Service, image: bytes) -> np.ndarray:
    """The image as the model takes it (what the API would make of it), HWC uint8."""
    (model,) = requests.get(service.url + "/v1/models", timeout=5).json()["models"]
    t = to_model_input(open_image(image, 10**8), model["input"], 10**8)
    return np.frombuffer(t.data, np.uint8).reshape(t.shape)


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(ARCH)
    assert not client.is_model_ready("no-such-model")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata(ARCH)
    assert meta["name"] == ARCH
    assert {(i["name"], i["datatype"]) for i in meta["inputs"]} == {("image", "BYTES"), ("pixels", "UINT8")}
    assert [i["shape"] for i in meta["inputs"] if i["datatype"] == "UINT8"] == [[-1, 224, 224, 3]]
    assert meta["parameters"]["live_workers"] == 1 and meta["parameters"]["max_batch_size"] == 16
    assert [(o["name"], o["datatype"]) for o in meta["outputs"]] == [
        ("scores", "FP32"),
        ("indices", "INT64"),
        ("labels", "BYTES"),
    ]


def test_encoded_images_in_binary_get_v1s_answers_in_order(
    service: Service, client: triton.InferenceServerClient
) -> None:
    images = [make_image(seed, (300 + 20 * seed, 240)) for seed in range(3)]
    expected = [v1_top5(service, im) for im in images]
    assert len({e[0]["index"] for e in expected}) > 1, "the images would not tell answers apart"
    inp = triton.InferInput("image", [len(images)], "BYTES")
    inp.set_data_from_numpy(np.array(images, dtype=object), binary_data=True)
    outputs = [triton.InferRequestedOutput(name, binary_data=True) for name in OUTPUTS]
    result = client.infer(ARCH, [inp], outputs=outputs, request_id="abc", parameters={"topk": 5})
    assert result.get_response()["id"] == "abc"
    assert all("binary_data_size" in result.get_output(name)["parameters"] for name in OUTPUTS)
    scores, indices, labels = (result.as_numpy(name) for name in OUTPUTS)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == labels.shape == (3, 5)
    for i, v1 in enumerate(expected):
        assert_same_top5(v1, scores[i], indices[i], [b.decode() for b in labels[i]])


def test_pixels_as_uint8_get_the_same_answer_as_the_encoded_image(
    service: Service, client: triton.InferenceServerClient
) -> None:
    image = make_image(7)
    inp = triton.InferInput("pixels", [1, 224, 224, 3], "UINT8")
    inp.set_data_from_numpy(pixels(service, image)[None], binary_data=True)
    result = client.infer(ARCH, [inp], parameters={"topk": 5})  # no outputs named: all, in binary
    scores, indices, labels = (result.as_numpy(name) for name in OUTPUTS)
    assert_same_top5(v1_top5(service, image), scores[0], indices[0], [b.decode() for b in labels[0]])


def test_json_requests_without_the_binary_extension(service: Service) -> None:
    image = make_image(11)
    v1 = v1_top5(service, image)
    url = f"{service.url}/v2/models/{ARCH}/infer"
    bodies = [
        {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(image).decode()]}]},
        {
            "inputs": [
                {"name": "pixels", "datatype": "UINT8", "shape": [224, 224, 3], "data": pixels(service, image).tolist()}
            ]
        },
    ]
    for body in bodies:
        resp = requests.post(url, json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert resp.headers["Content-Type"] == "application/json"
        answer = resp.json()
        assert answer["model_name"] == ARCH
        out = {o["name"]: o for o in answer["outputs"]}
        assert [o["name"] for o in answer["outputs"]] == list(OUTPUTS)
        assert all(o["shape"] == [1, 5] for o in out.values())
        assert_same_top5(v1, np.array(out["scores"]["data"]), np.array(out["indices"]["data"]), out["labels"]["data"])
    one = requests.post(url, json={**bodies[0], "outputs": [{"name": "labels"}], "parameters": {"topk": 2}}, timeout=60)
    assert one.json()["outputs"] == [
        {"name": "labels", "datatype": "BYTES", "shape": [1, 2], "data": [p["label"] for p in v1[:2]]}
    ]


def test_client_errors_are_4xx_in_v2s_shape(service: Service, client: triton.InferenceServerClient) -> None:
    def status_of(model: str, inp: triton.InferInput) -> str:
        with pytest.raises(InferenceServerException) as exc:
            client.infer(model, [inp])
        return str(exc.value.status())

    jpeg = triton.InferInput("image", [1], "BYTES")
    jpeg.set_data_from_numpy(np.array([make_image(1)], dtype=object))
    assert status_of("no-such-model", jpeg) == "404"
    floats = triton.InferInput("pixels", [1, 224, 224, 3], "FP32")
    floats.set_data_from_numpy(np.zeros((1, 224, 224, 3), np.float32))
    assert status_of(ARCH, floats) == "400"
    small = triton.InferInput("pixels", [1, 200, 200, 3], "UINT8")
    small.set_data_from_numpy(np.zeros((1, 200, 200, 3), np.uint8))
    assert status_of(ARCH, small) == "400"
    not_an_image = triton.InferInput("image", [1], "BYTES")
    not_an_image.set_data_from_numpy(np.array([b"cat.jpg"], dtype=object))
    assert status_of(ARCH, not_an_image) == "400"

    url = f"{service.url}/v2/models/{ARCH}/infer"
    cases: list[tuple[dict[str, str], bytes, int]] = [
        ({}, b"{not json", 400),
        ({}, json.dumps({"inputs": []}).encode(), 400),
        ({"Inference-Header-Content-Length": "9999"}, b"{}", 400),
        ({"Content-Encoding": "gzip"}, b"\x1f\x8b", 415),
        ({}, b"[" * 100_000, 400),
    ]
    for headers, body, status in cases:
        resp = requests.post(url, data=body, headers=headers, timeout=30)
        assert resp.status_code == status, (body[:40], resp.text)
        assert isinstance(resp.json()["error"], str)
    for method, path, status in [("GET", "/v2/models/no-such-model", 404), ("GET", "/v2/nowhere", 404),
                                 ("GET", f"/v2/models/{ARCH}/infer", 405)]:  # fmt: skip
        resp = requests.request(method, service.url + path, timeout=10)
        assert resp.status_code == status and isinstance(resp.json()["error"], str)
    assert client.is_server_ready()
