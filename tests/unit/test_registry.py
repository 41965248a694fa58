"""How --model becomes a handler: torchvision names, and import strings of a module or a handler."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from common.config import Settings
from worker.handler import IMAGENET_SPEC, ModuleHandler, TorchvisionClassifier
from worker.registry import load_handler


@pytest.fixture
def user_module() -> types.ModuleType:
    mod = types.ModuleType("user_models")

    class MyHandler:
        spec = IMAGENET_SPEC

        def setup(self, device: torch.device) -> None: ...
        def preprocess(self, inputs: object) -> torch.Tensor: ...
        def forward(self, batch: torch.Tensor) -> torch.Tensor: ...
        def postprocess(self, output: torch.Tensor, params: object) -> list: ...
        def check_input(self, t: object) -> None: ...

    mod.linear = lambda: torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 4))  # type: ignore[attr-defined]
    mod.handler = MyHandler  # type: ignore[attr-defined]
    mod.not_a_model = lambda: 42  # type: ignore[attr-defined]
    sys.modules["user_models"] = mod
    yield mod
    del sys.modules["user_models"]


def test_torchvision_names_give_the_classifier() -> None:
    assert isinstance(load_handler(Settings(model="mobilenet_v3_small", weights="random")), TorchvisionClassifier)


def test_a_module_factory_is_served_as_embeddings(user_module: types.ModuleType) -> None:
    s = Settings(model="user_models:linear")
    assert s.served_name == "linear"
    handler = load_handler(s)
    assert isinstance(handler, ModuleHandler)
    handler.setup(torch.device("cpu"))
    out = handler.postprocess(handler.forward(torch.zeros(3, 3, 224, 224)), [{}] * 3)
    assert len(out) == 3 and len(out[0]["embedding"]) == 4


def test_a_handler_factory_is_used_as_it_is(user_module: types.ModuleType) -> None:
    assert type(load_handler(Settings(model="user_models:handler"))).__name__ == "MyHandler"


@pytest.mark.parametrize("target", ["user_models:not_a_model", "user_models:missing", "nowhere_at_all:f"])
def test_bad_import_strings_say_what_is_wrong(user_module: types.ModuleType, target: str) -> None:
    with pytest.raises(ValueError, match=r"user_models|nowhere_at_all"):
        load_handler(Settings(model=target))
