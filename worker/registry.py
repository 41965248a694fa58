"""Which handler serves ``--model``: a torchvision architecture by name, or a user's own model by
import string ``package.module:factory``.

The factory is called with no arguments and returns either a ``torch.nn.Module`` (served by
``ModuleHandler``: the usual image input, one ``{"embedding": [...]}`` per input) or a complete
handler (``worker.handler.Handler``: ``spec``, ``setup``, ``preprocess``, ``forward``,
``postprocess``, ``check_input``) for full control of pre- and postprocessing.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TypeVar, cast

import torch

from common.config import Settings
from worker.handler import IMAGENET_SPEC, Handler, ImageHandler, ModuleHandler, TorchvisionClassifier

HANDLER_METHODS = ("setup", "preprocess", "forward", "postprocess", "check_input")


def load_handler(settings: Settings, device: torch.device | None = None) -> Handler:
    """The handler for ``settings.model``; raises ValueError with a clear message when there is none."""
    decode = decodes_jpeg(settings.preprocess, device)
    if ":" not in settings.model:
        handler = TorchvisionClassifier(
            settings.model, settings.weights, settings.dtype, settings.channels_last, decode
        )
        return _with_options(handler, settings)
    made = _call_factory(settings.model)
    if isinstance(made, torch.nn.Module):
        spec = dataclasses.replace(IMAGENET_SPEC, accepts=("uint8", "jpeg") if decode else ("uint8",))
        return _with_options(
            ModuleHandler(made, spec, dtype=settings.dtype, channels_last=settings.channels_last), settings
        )
    missing = [m for m in HANDLER_METHODS if not callable(getattr(made, m, None))]
    if missing or not hasattr(made, "spec"):
        raise ValueError(
            f"{settings.model} returned a {type(made).__name__}: neither a torch.nn.Module nor a handler "
            f"(missing {', '.join(missing) or 'spec'})"
        )
    return cast(Handler, made)


H = TypeVar("H", bound=ImageHandler)


def _with_options(handler: H, settings: Settings) -> H:
    handler.fuse, handler.compile = settings.fuse, settings.compile
    return handler


def decodes_jpeg(preprocess: str, device: torch.device | None) -> bool:
    """Whether the worker takes JPEG bytes and decodes them itself. ``auto``: on CUDA (nvjpeg, then
    the preset's own float resize on the GPU), not on a CPU, where the API's Pillow path is the exact
    one (torch's faster uint8 resize differs from Pillow's by a grey level in under 1 % of pixels)."""
    return preprocess == "worker" or (preprocess == "auto" and device is not None and device.type == "cuda")


def _call_factory(target: str) -> object:
    module_name, _, attr = target.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"cannot import {target!r}: {exc}") from None
    return factory() if callable(factory) and not isinstance(factory, torch.nn.Module) else factory
