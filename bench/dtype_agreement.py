"""Does a lower-precision dtype change the answers? Top-1 of float32 against ``--dtype`` on a test set.

    python bench/dtype_agreement.py --model resnet18 --dtype bfloat16 [--images N] [--seed S]

Random-init weights (seeded; pretrained ones cannot be downloaded everywhere) whose BatchNorm
statistics are calibrated on other generated images, so that different images get different
classes (plain random init gives every image the same one); generated 640x480 JPEGs, preprocessed
by the API's path; both dtypes run the same weights through the worker's own handler. Prints the
share of images whose top-1 class is the same, and how many distinct top-1 classes the float32
model gave (few would make the agreement meaningless).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from api.images import open_image, to_model_input
from common.bench import make_images
from common.protocol import TensorData
from worker.handler import TorchvisionClassifier


def calibrated(model: str, inputs: list[TensorData], seed: int, path: str) -> None:
    """Random weights with BatchNorm running statistics measured on ``inputs``, saved to ``path``."""
    torch.manual_seed(seed)
    handler = TorchvisionClassifier(model, "random")
    handler.fuse = False  # the BatchNorm layers must stay to be calibrated
    handler.setup(torch.device("cpu"))
    net: torch.nn.Module = handler.model
    for m in net.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None  # a cumulative average over the calibration batch
            m.reset_running_stats()
    net.train()
    with torch.no_grad():
        net(handler.preprocess(inputs))
    torch.save(net.state_dict(), path)


def top1(model: str, dtype: str, inputs: list[TensorData], weights: str) -> torch.Tensor:
    handler = TorchvisionClassifier(model, weights, dtype)
    handler.setup(torch.device("cpu"))
    with torch.inference_mode():
        return torch.cat([handler.forward(handler.preprocess(inputs[i : i + 16])).float().argmax(1)
                          for i in range(0, len(inputs), 16)])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    handler = TorchvisionClassifier(a.model, "random")
    spec, limit = handler.spec.to_dict(), 10**8

    def prep(n: int, seed: int) -> list[TensorData]:
        return [to_model_input(open_image(b, limit), spec, limit) for b in make_images(n, (640, 480), seed=seed)]

    inputs = prep(a.images, a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, f"{a.model}.pt")
        calibrated(a.model, prep(32, a.seed + 10_000), a.seed, weights)
        ref, got = top1(a.model, "float32", inputs, weights), top1(a.model, a.dtype, inputs, weights)
    same = (ref == got).float().mean().item()
    print(f"{a.model} {a.dtype} vs float32: top-1 the same for {same:.1%} of {a.images} images "
          f"({len(set(ref.tolist()))} distinct float32 top-1 classes)")  # fmt: skip


if __name__ == "__main__":
    main()
