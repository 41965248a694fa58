"""The API's torch-free preprocessing against torchvision's own preset, and hostile uploads."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchvision.transforms import functional as F

from api.images import jpeg_frame, open_image, to_model_input
from api.inference import model_input
from common.errors import InvalidImage, PayloadTooLarge
from tests.conftest import make_image
from worker.handler import TorchvisionClassifier

MAX_PIXELS = 40_000_000


def _spec(arch: str) -> dict[str, object]:
    return TorchvisionClassifier(arch, "random").spec.to_dict()


def _reference_uint8(pil: Image.Image, arch: str) -> np.ndarray:
    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    img = F.resize(pil, preset.resize_size, interpolation=preset.interpolation, antialias=preset.antialias)
    img = F.center_crop(img, preset.crop_size)
    return F.pil_to_tensor(img).permute(1, 2, 0).numpy()


@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_b1", "inception_v3"])
@pytest.mark.parametrize("size", [(640, 480), (480, 640), (300, 300), (97, 1013), (224, 224), (1000, 260)])
def test_model_input_is_pixel_identical_to_the_torchvision_preset(arch: str, size: tuple[int, int]) -> None:
    body = make_image(sum(size), size, "PNG")
    spec = _spec(arch)
    got = to_model_input(open_image(body, MAX_PIXELS), spec, MAX_PIXELS)
    want = _reference_uint8(Image.open(io.BytesIO(body)).convert("RGB"), arch)
    assert list(got.shape) == spec["shape"] == list(want.shape)
    assert np.array_equal(np.frombuffer(got.data, np.uint8).reshape(got.shape), want)


def test_worker_side_normalisation_matches_the_preset_tensor() -> None:
    arch = "resnet18"
    body = make_image(3, (640, 480))
    handler = TorchvisionClassifier(arch, "random", channels_last=True)
    handler.setup(torch.device("cpu"))
    x = handler.preprocess([to_model_input(open_image(body, MAX_PIXELS), handler.spec.to_dict(), MAX_PIXELS)])
    preset = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    want = preset(Image.open(io.BytesIO(body)).convert("RGB")).unsqueeze(0)
    assert torch.allclose(x, want, atol=1e-5)


@pytest.mark.parametrize("mode,fmt", [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
                                      ("LA", "PNG"), ("RGB", "WEBP"), ("1", "PNG")])  # fmt: skip
def test_every_image_mode_becomes_rgb_model_input(mode: str, fmt: str) -> None:
    body = make_image(7, (200, 150), fmt, mode)
    got = to_model_input(open_image(body, MAX_PIXELS), _spec("resnet18"), MAX_PIXELS)
    assert got.shape == (224, 224, 3) and len(got.data) == 224 * 224 * 3


def test_animated_image_uses_its_first_frame() -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:])
    got = to_model_input(open_image(buf.getvalue(), MAX_PIXELS), _spec("resnet18"), MAX_PIXELS)
    pixels = np.frombuffer(got.data, np.uint8).reshape(got.shape)
    assert pixels[..., 0].mean() > 200 and pixels[..., 2].mean() < 60


def test_pixel_limit_is_checked_before_decoding() -> None:
    body = make_image(1, (2000, 1500), "PNG")
    with pytest.raises(PayloadTooLarge, match="2000x1500"):
        open_image(body, max_pixels=1_000_000)


def test_extreme_aspect_ratio_is_refused_before_resizing() -> None:
    body = make_image(1, (20000, 2), "PNG")
    im = open_image(body, MAX_PIXELS)
    with pytest.raises(PayloadTooLarge, match="aspect"):
        to_model_input(im, _spec("resnet18"), max_pixels=4_000_000)


@pytest.mark.parametrize(
    "body",
    [b"", b"hello world", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"GIF89a" + b"\x00" * 100, b"%PDF-1.4 ..."],
)
def test_bodies_that_are_not_images_are_invalid(body: bytes) -> None:
    with pytest.raises(InvalidImage) as caught:
        to_model_input(open_image(body, MAX_PIXELS), _spec("resnet18"), MAX_PIXELS)
    assert " at 0x" not in caught.value.message  # the client reads no object repr of the server's


def test_a_body_no_decoder_recognises_is_named_as_such_to_the_client() -> None:
    with pytest.raises(InvalidImage) as caught:
        open_image(b"definitely not a jpeg", MAX_PIXELS)
    assert caught.value.message == "not a JPEG, PNG or WebP image (cannot identify image file)"


def test_truncated_jpeg_is_invalid_not_a_crash() -> None:
    body = make_image(5, (640, 480))
    with pytest.raises(InvalidImage):
        to_model_input(open_image(body[: len(body) // 2], MAX_PIXELS), _spec("resnet18"), MAX_PIXELS)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=2048), st.integers(0, 4000))
def test_fuzz_corrupted_images_are_invalid_or_decoded(noise: bytes, cut: int) -> None:
    base = make_image(9, (64, 48), "PNG")
    body = base[:cut] + noise + base[cut + len(noise) :]
    try:
        got = to_model_input(open_image(body, MAX_PIXELS), _spec("resnet18"), MAX_PIXELS)
    except (InvalidImage, PayloadTooLarge):
        return
    assert len(got.data) == 224 * 224 * 3


def test_worker_side_jpeg_decoding_matches_the_api_path() -> None:
    """With --preprocess worker, JPEG bytes decoded and resized in the worker give (nearly) the same
    model input as the API's Pillow path, and a batch may mix both kinds of input."""
    from common.protocol import TensorData

    handler = TorchvisionClassifier("resnet18", "random", decode_jpeg=True)
    handler.setup(torch.device("cpu"))
    bodies = [make_image(s, (640, 480)) for s in range(3)]
    api_inputs = [to_model_input(open_image(b, MAX_PIXELS), handler.spec.to_dict(), MAX_PIXELS) for b in bodies]
    jpeg_inputs = [TensorData("jpeg", (len(b),), b) for b in bodies]
    assert all(handler.check_input(t) is None for t in jpeg_inputs)
    a = handler.preprocess(api_inputs)
    mixed = handler.preprocess([jpeg_inputs[0], api_inputs[1], jpeg_inputs[2]])
    assert torch.equal(mixed[1], a[1])
    assert (mixed - a).abs().mean() < 0.02  # resampling differs slightly from Pillow's, not more
    # The worker's crops are Pillow's but for rounding: one grey level, in under 1 % of pixels.
    grey_level = 1.0 / (255.0 * min(handler.spec.std))  # one grey level, normalised
    for body, api in zip(bodies, api_inputs):
        prepared = handler.prepare([TensorData("jpeg", (len(body),), body)])
        diff = (handler.preprocess(prepared) - handler.preprocess([api])).abs()
        assert diff.max() <= grey_level + 1e-5 and (diff > 1e-5).float().mean() < 0.01


@pytest.mark.parametrize(("dtype", "channels_last"), [("float32", True), ("float32", False), ("bfloat16", True)])
def test_images_the_collector_prepared_make_the_same_batch(dtype: str, channels_last: bool) -> None:
    """On a CPU the collector thread normalises each image as it arrives; the batch the model gets
    is the one batched normalisation would have made: same values, dtype and memory format."""
    from common.protocol import TensorData

    handler = TorchvisionClassifier("resnet18", "random", dtype=dtype, channels_last=channels_last, decode_jpeg=True)
    handler.setup(torch.device("cpu"))
    bodies = [make_image(s, (640, 480)) for s in range(3)]
    inputs = [to_model_input(open_image(b, MAX_PIXELS), handler.spec.to_dict(), MAX_PIXELS) for b in bodies]
    inputs.append(TensorData("jpeg", (len(bodies[0]),), bodies[0]))
    prepared = handler.prepare(inputs)
    assert all(isinstance(p, torch.Tensor) and p.dtype == handler.dtype for p in prepared)
    got, want = handler.preprocess(prepared), handler.preprocess(inputs)
    assert got.dtype == want.dtype == handler.dtype and got.shape == want.shape == (4, 3, 224, 224)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.allclose(got.float(), want.float(), atol=1e-5 if dtype == "float32" else 2e-2)


def test_worker_side_decoding_rejects_a_broken_jpeg_as_invalid_image() -> None:
    from common.protocol import TensorData

    handler = TorchvisionClassifier("resnet18", "random", decode_jpeg=True)
    handler.setup(torch.device("cpu"))
    body = make_image(1, (320, 240))
    with pytest.raises(InvalidImage):
        handler.preprocess([TensorData("jpeg", (len(body) // 3,), body[: len(body) // 3])])
    assert TorchvisionClassifier("resnet18", "random").check_input(TensorData("jpeg", (4,), b"abcd"))


def test_jpegs_of_several_sizes_cropped_together_match_each_cropped_alone() -> None:
    """A batch's JPEGs are resized together, one call per size (as on CUDA): the same model input
    as each image decoded and cropped on its own, in the batch's order."""
    from common.protocol import TensorData

    handler = TorchvisionClassifier("resnet18", "random", decode_jpeg=True)
    handler.setup(torch.device("cpu"))
    sizes = [(640, 480), (480, 640), (640, 480), (300, 300), (640, 480)]
    jpegs = [TensorData("jpeg", (len(b),), b) for b in (make_image(i, size) for i, size in enumerate(sizes))]
    together = handler.preprocess(jpegs)
    alone = torch.cat([handler.preprocess(handler.prepare([j])) for j in jpegs])
    assert together.shape == alone.shape == (len(sizes), 3, 224, 224)
    assert torch.allclose(together, alone, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_jpegs_prepared_together_on_the_gpu_make_the_batch_the_cpu_makes() -> None:
    """On CUDA the collector decodes a take's JPEGs in one nvjpeg call and crops them together on
    the GPU: the batch is the CPU path's, up to the two JPEG decoders' rounding."""
    from common.protocol import TensorData

    cpu, gpu = (TorchvisionClassifier("resnet18", "random", decode_jpeg=True) for _ in range(2))
    cpu.setup(torch.device("cpu"))
    gpu.setup(torch.device("cuda"))
    sizes = [(640, 480), (480, 640), (640, 480)]
    jpegs = [TensorData("jpeg", (len(b),), b) for b in (make_image(i, size) for i, size in enumerate(sizes))]
    prepared = gpu.prepare(jpegs)
    assert all(isinstance(p, torch.Tensor) and p.is_cuda and p.dtype == torch.uint8 for p in prepared)
    on_gpu = gpu.preprocess(prepared).cpu()
    on_cpu = torch.cat([cpu.preprocess(cpu.prepare([j])) for j in jpegs])
    assert on_gpu.shape == on_cpu.shape == (3, 3, 224, 224)
    assert (on_gpu - on_cpu).abs().mean() < 0.05  # about three grey levels


# ---- a JPEG's frame without Pillow (api/images.py's jpeg_frame), for workers that decode JPEGs ----


def _jpeg(size: tuple[int, int], mode: str = "RGB", **save: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, "#3a7").save(buf, "JPEG", **save)
    return buf.getvalue()


def _exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the model sees the pixels as stored, either way
    exif[0x010F] = "a camera"
    return exif.tobytes()


def _pillows_frame(body: bytes) -> tuple[int, int, int]:
    im = Image.open(io.BytesIO(body))
    return (*im.size, len(im.getbands()))


@pytest.mark.parametrize(
    ("size", "mode", "save"),
    [
        ((640, 480), "RGB", {}),
        ((1, 1), "L", {}),
        ((3000, 17), "RGB", {"progressive": True}),
        ((33, 65), "RGB", {"optimize": True, "subsampling": 0}),
        ((64, 48), "RGB", {"exif": _exif(), "icc_profile": b"\x01" * 70_000, "comment": b"several APP2 segments"}),
        ((64, 48), "L", {"progressive": True, "quality": 20}),
        ((64, 48), "RGB", {"restart_marker_blocks": 1}),
    ],
)
def test_a_plain_jpegs_frame_is_read_as_pillow_reads_it(
    size: tuple[int, int], mode: str, save: dict[str, object]
) -> None:
    body = _jpeg(size, mode, **save)
    assert jpeg_frame(body) == _pillows_frame(body) == (*size, len(mode))


def test_anything_but_a_plain_jpeg_is_left_to_pillow() -> None:
    body = _jpeg((64, 48))
    sof = body.index(b"\xff\xc0")
    twelve_bit = body[: sof + 4] + b"\x0c" + body[sof + 5 :]
    assert jpeg_frame(twelve_bit) is None
    with pytest.raises(InvalidImage):  # Pillow refuses it, as before
        open_image(twelve_bit, MAX_PIXELS)
    assert jpeg_frame(_jpeg((8, 8), "CMYK")) is None  # Pillow converts it for the model
    assert jpeg_frame(make_image(1, (8, 8), "PNG")) is None
    assert jpeg_frame(body[:sof]) is None  # no frame yet
    assert jpeg_frame(body[: sof + 30]) is None  # a frame, no scan
    padded = body[:sof] + b"\xff" + body[sof:]  # a fill byte before a marker: legal, and Pillow's business
    assert jpeg_frame(padded) is None and _pillows_frame(padded) == (64, 48, 3)


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 700), st.binary(min_size=1, max_size=6), st.integers(0, 1500))
@pytest.mark.filterwarnings("ignore:.*:UserWarning:PIL")  # a damaged EXIF block: Pillow warns and skips it
def test_a_damaged_header_is_read_as_pillow_reads_it_or_left_to_pillow(at: int, noise: bytes, cut: int) -> None:
    base = _jpeg((64, 48), exif=_exif(), comment=b"a comment")
    body = (base[:at] + noise + base[at + len(noise) :])[: len(base) - cut]
    frame = jpeg_frame(body)  # never raises
    if frame is None:
        return  # Pillow decides, as before
    try:
        pillows = _pillows_frame(body)
    except Exception:
        return  # Pillow checks a table's contents too; the worker's decoder checks them there
    assert frame == pillows


def test_a_jpeg_for_a_decoding_worker_goes_as_it_came_and_its_size_is_still_checked() -> None:
    spec = {**_spec("resnet18"), "accepts": ["uint8", "jpeg"]}
    body = _jpeg((640, 480))
    got = model_input(body, spec, MAX_PIXELS)
    assert (got.dtype, got.shape, got.data) == ("jpeg", (len(body),), body)
    sof = body.index(b"\xff\xc0")
    huge = body[: sof + 5] + (30_000).to_bytes(2, "big") * 2 + body[sof + 9 :]  # 30000x30000, a few KB
    with pytest.raises(PayloadTooLarge, match="30000x30000"):
        model_input(huge, spec, MAX_PIXELS)
    cmyk = model_input(_jpeg((64, 48), "CMYK"), spec, MAX_PIXELS)  # decoded here, as Pillow converts it
    assert (cmyk.dtype, cmyk.shape) == ("uint8", (224, 224, 3))
