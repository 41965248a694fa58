"""Many models on one Redis: a torchvision classifier and a user's own embedding model (loaded by
import string) served side by side through one API."""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest
import requests
import torch
import torchvision
from PIL import Image

from tests.conftest import RedisServer, make_image
from tests.e2e.conftest import ARCH, ROOT, Service

pytestmark = pytest.mark.e2e
EXAMPLES = ROOT / "docs" / "examples"


def test_a_classifier_and_an_embedding_model_side_by_side(
    redis_server: RedisServer, weights_file: Path, tmp_path: Path
) -> None:
    svc = Service(redis_server.url, weights_file, tmp_path, env={"PYTHONPATH": str(EXAMPLES)})
    embedder = svc._spawn("embedder", ["worker", "--model", "embedder:resnet18_embedder", "--device", "cpu",
                                       "--torch-threads", "1", "--max-batch-size", "8"])  # fmt: skip
    svc.workers.append(embedder)
    try:
        svc.wait_ready()
        deadline = time.monotonic() + 120
        while len(models := requests.get(svc.url + "/v1/models", timeout=5).json()["models"]) < 2:
            assert time.monotonic() < deadline and embedder.poll() is None
            time.sleep(0.2)
        assert {m["name"]: m["live_workers"] for m in models} == {ARCH: 1, "resnet18_embedder": 1}

        image = make_image(11, (320, 240))
        jpeg = {"Content-Type": "image/jpeg"}
        cls = requests.post(f"{svc.url}/v1/models/{ARCH}/predict", data=image, headers=jpeg, timeout=30).json()
        assert len(cls["predictions"]) == 5
        emb = requests.post(f"{svc.url}/v1/models/resnet18_embedder/predict", data=image, headers=jpeg, timeout=30)
        assert emb.status_code == 200
        vector = torch.tensor(emb.json()["outputs"]["embedding"])

        sys.path.insert(0, str(EXAMPLES))
        try:
            from embedder import resnet18_embedder  # type: ignore[import-not-found]
        finally:
            sys.path.remove(str(EXAMPLES))
        model = resnet18_embedder().eval()
        preset = torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()
        with torch.inference_mode():
            want = model(preset(Image.open(io.BytesIO(image)).convert("RGB")).unsqueeze(0))[0]
        assert vector.shape == (512,)
        assert torch.allclose(vector, want, rtol=1e-3, atol=1e-3)
    finally:
        svc.stop()


def test_a_bad_import_string_is_a_clear_startup_error(redis_server: RedisServer, tmp_path: Path) -> None:
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "worker", "--model", "no_such_module:factory", "--device", "cpu",
         "--redis-url", redis_server.url],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0 and "cannot import 'no_such_module:factory'" in proc.stderr
