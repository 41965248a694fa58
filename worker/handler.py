"""The handler interface a model plugs in through, and the torchvision classifier that implements it.

Contract (LitServe's and TorchServe's split): ``setup`` loads the model on a device, never
``__init__``; ``preprocess`` turns a batch of input tensors into one device tensor; ``forward`` runs
the model; ``postprocess`` returns exactly one result per input, in order. The worker owns
``torch.inference_mode()`` and checks the count.

Optional: ``prepare(inputs) -> list``, per-item work (decoding, say) that the worker runs on its
collector thread as frames arrive, overlapping the forward pass of the batch before; its outputs
are what ``preprocess`` then receives. Without it ``preprocess`` gets the inputs as they came.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, cast

import torch
import torchvision
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F2

from common.errors import InvalidImage
from common.protocol import TensorData
from worker.staging import Staging, hold

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MAX_TOPK = 100


@dataclass(frozen=True)
class InputSpec:
    """What the API must send: a ``crop_size``² RGB uint8 image (HWC), made by resizing the shorter
    side to ``resize_size`` with ``interpolation`` and center-cropping, as torchvision's
    ``ImageClassification`` preset does. ``mean`` and ``std`` are applied in the worker."""

    resize_size: int
    crop_size: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    accepts: tuple[str, ...] = ("uint8",)  # "jpeg": the worker decodes JPEG bytes itself

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.crop_size, self.crop_size, 3)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["dtype"] = "uint8"
        return d


Prepared = TensorData | torch.Tensor  # an input as it arrived, or an HWC crop: uint8, or normalised on a CPU


def _hwc(t: TensorData) -> torch.Tensor:
    """uint8 pixels (HWC) as a tensor over the frame's own bytes: no copy."""
    return _bytes_view(t.data).view(*t.shape)


def _bytes_view(data: bytes) -> torch.Tensor:
    """A uint8 tensor over ``data`` itself: no copy. Only ever read (a batch is a copy, a decoder
    reads), so torch's warning about a read-only buffer does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=torch.uint8)


def fuse_conv_bn(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with each eval-mode BatchNorm folded into the convolution before it (torch.fx), so
    the forward pass skips a full read and write of every such activation: the same answers up to
    float rounding. A model that torch.fx cannot trace is returned as it is, with a log line."""
    from torch.fx.experimental.optimization import fuse

    try:
        fused: torch.nn.Module = fuse(model)
    except Exception as exc:
        logger.info("BatchNorm not folded: %s cannot be traced (%s)", type(model).__name__, str(exc)[:200])
        return model
    return fused


def allow_compiled_shapes(n: int) -> None:
    """Let torch.compile keep one graph per batch shape for ``n`` shapes (plus slack) instead of
    falling back to eager once dynamo's default cache limit is reached."""
    import torch._dynamo as dynamo

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, n + 2)


IMAGENET_SPEC = InputSpec(256, 224, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class Handler(Protocol):
    spec: InputSpec

    def setup(self, device: torch.device) -> None: ...

    def preprocess(self, inputs: Sequence[Any]) -> torch.Tensor: ...

    def forward(self, batch: torch.Tensor) -> torch.Tensor: ...

    def postprocess(self, output: torch.Tensor, params: Sequence[dict[str, Any]]) -> list[dict[str, Any]]: ...

    def check_input(self, t: TensorData) -> str | None: ...


def prepare_inputs(handler: Handler, inputs: Sequence[Any]) -> list[Any]:
    """``inputs`` as the worker's collector thread hands them to ``preprocess``: through the
    handler's optional ``prepare``, or as they came."""
    prepare = getattr(handler, "prepare", None)  # optional in the Handler protocol
    return list(prepare(inputs)) if prepare is not None else list(inputs)


class ImageHandler:
    """What every image model shares: a model-sized uint8 input (or JPEG bytes it decodes), scaled
    and normalised on the device, and a model run in ``dtype`` and memory format. Subclasses provide
    ``build()`` (the module, on the CPU) and ``postprocess``."""

    def __init__(self, spec: InputSpec, dtype: str = "float32", channels_last: bool = True) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
        self.spec = spec
        self._interpolation = InterpolationMode(spec.interpolation)
        self.dtype = DTYPES[dtype]
        self.channels_last = channels_last
        self.fuse = True  # fold BatchNorm into convolutions at setup (``fuse_conv_bn``)
        self.compile = False  # torch.compile the model at setup
        self.weights_source = ""
        self._staging: Staging | None = None

    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def setup(self, device: torch.device) -> None:
        model = self.build().eval()
        if self.fuse:
            model = fuse_conv_bn(model)
        model.to(device=device, dtype=self.dtype)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        # torch.compile returns an OptimizedModule (an nn.Module), typed as a plain callable
        self.model: torch.nn.Module = (
            cast(torch.nn.Module, torch.compile(model, dynamic=False)) if self.compile else model
        )
        self.device = device
        shape = (1, 3, 1, 1)
        mean = torch.tensor(self.spec.mean, device=device).view(shape)
        std = torch.tensor(self.spec.std, device=device).view(shape)
        # (x / 255 - mean) / std as one multiply and one add on the uint8 values
        self._scale = 1.0 / (255.0 * std)
        self._shift = -mean / std
        self._scale_hwc, self._shift_hwc = self._scale.view(-1).clone(), self._shift.view(-1).clone()  # for HWC
        self._scale_row = self._scale_hwc.repeat(self.spec.crop_size).view(1, -1)  # one HWC row's worth
        self._shift_row = self._shift_hwc.repeat(self.spec.crop_size).view(1, -1)

    def stage(self, rows: int) -> None:
        """On a CPU in float32: normalise images from now on into a ring of ``rows`` preallocated
        rows (``worker/staging.py``), so that a batch of consecutive ones is a view, not a copy."""
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self._staging = Staging.sized(rows, self.spec.shape)

    @property
    def prepares_batches(self) -> bool:
        """Whether ``prepare`` does its work per call rather than per image, so that the collector
        should hand it everything it took at once: on CUDA, where one call decodes all the JPEGs
        together (nvjpeg, on the GPU's hardware decoder where it has one) and resizes them together."""
        return self.device.type == "cuda"

    def prepare(self, inputs: Sequence[TensorData]) -> list[Prepared]:
        """Per-item work the worker runs off the forward pass's thread, as frames arrive. On a CPU
        device: JPEGs decoded, resized and cropped, and every image scaled and shifted into the
        model's dtype (HWC), while its pixels are still in cache (into the staging ring's rows,
        once ``stage`` made one); ``preprocess`` then only stacks them, or takes a view of the ring.
        On CUDA: the JPEGs of the call decoded and cropped together on the GPU (uint8 HWC there,
        overlapping the forward pass of the batch before), uint8 pixels wrapped without a copy
        (``preprocess`` moves them, uint8 crossing at a quarter of float32's bytes).
        Raises ``InvalidImage`` for an input that will not go."""
        if self.device.type == "cuda":
            crops: list[Prepared] = [*self._batch_crops(inputs, on_device=False)]
            return crops
        return [
            self._normalised(self._crop_hwc(self._decode_one(t.data)) if t.dtype == "jpeg" else _hwc(t)) for t in inputs
        ]

    def _normalised(self, hwc: torch.Tensor) -> torch.Tensor:
        """A uint8 HWC image as the model's input values (x * scale + shift per channel), HWC and
        contiguous, in the model's dtype: one converting copy and one fused multiply-add, over
        whole rows against a row-long pattern of the channels' factors (a broadcast over a last
        dimension of 3 ran five times slower, 0.15 against 0.03 ms a 224x224 image)."""
        x = self._staging.take() if self._staging is not None and hwc.shape == self._staging.base.shape[1:] else None
        if x is None:
            x = torch.empty(hwc.shape, dtype=torch.float32)
        x.copy_(hwc)
        rows = x.view(x.shape[0], -1)
        if rows.shape[1] == self._scale_row.shape[1]:
            torch.addcmul(self._shift_row, rows, self._scale_row, out=rows)
        else:  # not the model's crop size (a user's own handler): per channel
            torch.addcmul(self._shift_hwc, x, self._scale_hwc, out=x)
        return x if self.dtype == torch.float32 else x.to(self.dtype)

    def preprocess(self, inputs: Sequence[Prepared]) -> torch.Tensor:
        """uint8 crops (HWC: from the API, or what ``prepare`` made) and JPEG bytes (decoded here,
        batched on the GPU) become one normalised batch on the device, NCHW in ``channels_last``
        memory when asked: one copy into the batch, then the scale and shift in place. Images that
        ``prepare`` already normalised on a CPU (float HWC) are only stacked."""
        if inputs and all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs):
            rows = [t for t in inputs if isinstance(t, torch.Tensor)]
            staged = self._staging.batch_view(rows) if self._staging is not None else None
            x = (staged if staged is not None else torch.stack(rows)).to(self.device).permute(0, 3, 1, 2)
            if not self.channels_last:
                return x.contiguous()
            return hold(x, rows) if staged is not None else x
        pending = [t for t in inputs if isinstance(t, TensorData)]
        crops = iter(self._batch_crops(pending))
        hwc = [next(crops) if isinstance(t, TensorData) else t for t in inputs]
        on_host = [h.device.type != self.device.type for h in hwc]  # one device per worker
        if all(on_host):  # one copy to the device for the whole batch
            x = torch.stack(hwc).to(self.device, non_blocking=True)
        else:  # on CUDA, crops nvjpeg made there beside uint8 inputs from the API (PNG uploads, say)
            x = torch.stack([h.to(self.device, non_blocking=True) if moved else h for h, moved in zip(hwc, on_host)])
        x = x.permute(0, 3, 1, 2)  # NCHW view with channels_last strides
        if not self.channels_last:
            x = x.contiguous()
        x = x.to(torch.float32).mul_(self._scale).add_(self._shift)
        return x.to(self.dtype)

    def _batch_crops(self, inputs: Sequence[TensorData], on_device: bool = True) -> list[torch.Tensor]:
        """HWC uint8 crops for ``inputs`` (JPEGs, decoded and cropped on the device, or uint8 pixels,
        moved there unless ``on_device`` is false), in order."""
        jpegs = [i for i, t in enumerate(inputs) if t.dtype == "jpeg"]
        decoded = dict(zip(jpegs, self._crops(self._decode([inputs[i].data for i in jpegs]))))
        return [
            decoded[i] if i in decoded else _hwc(t).to(self.device) if on_device else _hwc(t)
            for i, t in enumerate(inputs)
        ]

    def _crops(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """``_crop_hwc`` of each decoded CHW image, the images of one size resized together: on CUDA
        a resize of each image alone cost more CPU (kernel launches) than the GPU's work for it."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for i, chw in enumerate(images):
            by_shape.setdefault(tuple(chw.shape), []).append(i)
        out: list[torch.Tensor] = list(images)
        for idx in by_shape.values():
            batch = torch.stack([images[i] for i in idx]) if len(idx) > 1 else images[idx[0]].unsqueeze(0)
            # one contiguous copy for the group: its images then stack into a batch in one kernel
            for i, crop in zip(idx, self._crop_hwc(batch).contiguous().unbind(0)):
                out[i] = crop
        return out

    def _crop_hwc(self, chw: torch.Tensor) -> torch.Tensor:
        """The preset's resize (shorter side, antialiased) and center crop of a decoded CHW uint8
        image (or an NCHW batch of them), as an HWC (NHWC) view. torchvision's v2 kernels keep uint8
        (a vectorised path on the CPU); the v1 ones went through float and cost twice as much."""
        img = F2.resize(chw, [self.spec.resize_size], self._interpolation, antialias=True)
        crop: torch.Tensor = F2.center_crop(img, [self.spec.crop_size])
        return crop.movedim(-3, -1)

    def _decode_one(self, blob: bytes) -> torch.Tensor:
        try:
            out: torch.Tensor = torchvision.io.decode_jpeg(_bytes_view(blob), mode=torchvision.io.ImageReadMode.RGB)
            return out
        except RuntimeError as exc:
            raise InvalidImage(f"the JPEG cannot be decoded ({str(exc)[:200]})") from None

    def _decode(self, blobs: list[bytes]) -> list[torch.Tensor]:
        """Decode JPEGs as RGB CHW uint8: batched on CUDA (nvjpeg), else one by one; raises InvalidImage."""
        if not blobs:
            return []
        if self.device.type == "cuda":
            tensors = [_bytes_view(b) for b in blobs]  # nvjpeg only reads them: no copy
            try:
                rgb = torchvision.io.ImageReadMode.RGB
                return list(torchvision.io.decode_jpeg(tensors, mode=rgb, device=self.device))
            except RuntimeError:
                pass  # one bad or unsupported image fails the whole call: decode one by one below
        return [self._decode_one(b).to(self.device) for b in blobs]

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(batch)
        return out

    def check_input(self, t: TensorData) -> str | None:
        """Why ``t`` cannot go into a batch, or None when it can."""
        if t.dtype == "uint8" and tuple(t.shape) == self.spec.shape:
            return None
        if t.dtype == "jpeg" and "jpeg" in self.spec.accepts and len(t.shape) == 1:
            return None
        return f"input must be uint8 {list(self.spec.shape)} (or JPEG bytes: {self.spec.accepts}), got {t.dtype}"


class TorchvisionClassifier(ImageHandler):
    """Any torchvision classification architecture, with its preset's preprocessing and labels."""

    def __init__(
        self, arch: str, weights: str, dtype: str = "float32", channels_last: bool = True, decode_jpeg: bool = False
    ) -> None:
        try:
            self._meta_weights = torchvision.models.get_model_weights(arch).DEFAULT
        except (ValueError, KeyError) as exc:
            raise ValueError(f"unknown torchvision architecture {arch!r}: {exc}") from None
        preset = self._meta_weights.transforms()
        spec = InputSpec(
            resize_size=int(preset.resize_size[0]),
            crop_size=int(preset.crop_size[0]),
            interpolation=str(preset.interpolation.value),
            mean=tuple(float(m) for m in preset.mean),
            std=tuple(float(s) for s in preset.std),
            accepts=("uint8", "jpeg") if decode_jpeg else ("uint8",),
        )
        super().__init__(spec, dtype, channels_last)
        self.arch = arch
        self.weights = weights
        self.categories: list[str] = list(self._meta_weights.meta["categories"])

    def build(self) -> torch.nn.Module:
        return self._load()

    def _load(self) -> torch.nn.Module:
        w = self.weights
        if w.lower() == "random":
            return self._random()
        if w.upper() in ("DEFAULT", "AUTO"):
            try:
                model: torch.nn.Module = torchvision.models.get_model(self.arch, weights="DEFAULT")
                self.weights_source = "DEFAULT"
                return model
            except Exception as exc:
                if w.upper() == "DEFAULT":
                    raise RuntimeError(
                        f"could not load pretrained weights for {self.arch} ({exc}); "
                        "pass --weights PATH for a local state_dict, or --weights random"
                    ) from exc
                logger.warning("pretrained weights for %s unavailable (%s)", self.arch, exc)
                return self._random()
        model = self._build()
        state = torch.load(w, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{w} does not hold a state_dict")
        model.load_state_dict(state)
        self.weights_source = w
        return model

    def _random(self) -> torch.nn.Module:
        logger.warning(
            "\n%s\n  %s is running with RANDOMLY INITIALISED weights: its predictions are MEANINGLESS.\n"
            "  Use --weights DEFAULT (pretrained, needs the download) or --weights PATH (a state_dict).\n%s",
            "!" * 78,
            self.arch,
            "!" * 78,
        )
        self.weights_source = "random"
        return self._build()

    def _build(self) -> torch.nn.Module:
        model: torch.nn.Module = torchvision.models.get_model(self.arch, weights=None)
        return model

    def postprocess(self, output: torch.Tensor, params: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        ks = [int(p.get("topk", 5)) for p in params]
        k = min(max(ks), output.shape[1])
        scores, indices = torch.topk(output.float().softmax(dim=1), k, dim=1)  # on the device
        scores_l, indices_l = scores.cpu().tolist(), indices.cpu().tolist()
        out = []
        for s, i, ki in zip(scores_l, indices_l, ks):
            out.append({"indices": i[:ki], "scores": s[:ki], "labels": [self._label(j) for j in i[:ki]]})
        return out

    def _label(self, index: int) -> str:
        return self.categories[index] if index < len(self.categories) else str(index)


class ModuleHandler(ImageHandler):
    """A user's own ``torch.nn.Module`` (an embedding model, say): the API's usual image input, and
    each input's output row returned as ``{"embedding": [...]}``."""

    def __init__(self, module: torch.nn.Module, spec: InputSpec | None = None, dtype: str = "float32",
                 channels_last: bool = True) -> None:  # fmt: skip
        super().__init__(spec or IMAGENET_SPEC, dtype, channels_last)
        self.module = module
        self.weights_source = "the factory's own"

    def build(self) -> torch.nn.Module:
        return self.module

    def postprocess(self, output: torch.Tensor, params: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        rows = output.float().flatten(1).cpu().tolist()
        return [{"embedding": row} for row in rows]
