"""Serve your own model with redbatch:

    PYTHONPATH=docs/examples redbatch worker --model embedder:resnet18_embedder


A factory returning a ``torch.nn.Module`` is served with the usual image input (the API resizes to
224x224 as for ImageNet models) and answers ``{"outputs": {"embedding": [...]}}`` per image. Return
a full handler instead (an object with ``spec``, ``setup``, ``preprocess``, ``forward``,
``postprocess`` and ``check_input``, see ``worker/handler.py``) to control every step.
"""

from __future__ import annotations

import torch
import torchvision


def resnet18_embedder() -> torch.nn.Module:
    """resnet18 without its classifier: a 512-dimensional image embedding (random weights here;
    load your own with ``model.load_state_dict(torch.load(path, weights_only=True))``)."""
    torch.manual_seed(0)  # the same random weights in every process, so answers can be checked
    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Identity()
    return model
