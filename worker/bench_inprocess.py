"""``redbatch bench --in-process``: the model's own limit on this machine, without HTTP or Redis.

Two costs are timed apart, in this one process:

- preprocessing, both ways the service can run it: the API's path (``api.images``: Pillow decode,
  resize, crop), one image at a time on one core, and the worker's (``handler.prepare``:
  ``torchvision.io`` decode, uint8 resize and crop, and on a CPU the normalisation), on a CPU one
  image at a time on one core, on CUDA a batch at a time on the GPU (nvjpeg); the faster counts;
- the handler's batched ``preprocess + forward + postprocess`` under ``torch.inference_mode``, for
  each batch size after a warm-up of that size (on CUDA the clock stops after a synchronize), on
  what the faster path hands it, as in the worker.

The machine limit, as the project defines it: on a CPU, the number of cores times the best
single-thread rate of (preprocessing + model) per image, i.e. one single-threaded process per core;
the all-threads figure of one process is printed beside it, and so is what the cores do at once:
one one-thread process per core, all running the same loop (preprocessing then the model, at the
best batch size) over the same window, their rates summed. Where the cores slow each other (shared
caches and memory, a host's neighbours), that sum falls short of the limit. On CUDA, the model's
throughput at its best batch size, or less where preprocessing cannot keep up with it: the better
of all CPU cores running the API's path and the GPU decoding JPEGs beside the model's passes (its
JPEG decoder and the passes' kernels run at once when the worker overlaps them, so the limit is
the slower of the two, not their sum).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import IO, Any

import torch

from api.images import open_image, to_model_input
from common.bench import N_IMAGES, format_table, load_bodies
from common.config import Settings
from common.protocol import TensorData
from worker.graphs import use_cuda_graphs
from worker.handler import TorchvisionClassifier, allow_compiled_shapes
from worker.main import blank_batch, check_cuda_graphs, resolve_device

INPROCESS_DURATION_S, INPROCESS_WARMUP_S = 1.0, 0.5
MIN_PREP_IMAGES = 32
GPU_PREP_BATCH, GPU_PREP_ROUNDS = 64, 10  # on CUDA: JPEGs prepared per timed call, and the calls timed


@dataclass(frozen=True)
class InProcessConfig:
    model: str = "resnet18"
    weights: str = "random"
    device: str = "auto"
    dtype: str = "float32"
    channels_last: bool = True
    fuse: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    duration_s: float = INPROCESS_DURATION_S  # measured time per batch size (at least one batch)
    warmup_s: float = INPROCESS_WARMUP_S  # warm-up per batch size (at least one batch)
    threads: int = 0  # torch intra-op threads; 0: torch's default
    size: tuple[int, int] = (640, 480)
    images: tuple[str, ...] = ()
    max_pixels: int = field(default_factory=lambda: Settings().max_image_pixels)


@dataclass(frozen=True)
class BatchRow:
    batch_size: int
    iterations: int
    model_ms: float  # handler preprocess + forward + postprocess, per batch (median)
    model_ips: float  # images/s of the model alone
    total_ips: float  # images/s with the API's preprocessing too, one after the other in one thread


@dataclass(frozen=True)
class Sweep:
    threads: int
    rows: list[BatchRow]

    @property
    def best(self) -> BatchRow:
        return max(self.rows, key=lambda r: r.model_ips)


@dataclass(frozen=True)
class InProcessResult:
    model: str
    device: str
    dtype: str
    channels_last: bool
    options: str  # "BatchNorm folded", "torch.compile", "CUDA graphs"
    weights: str
    cores: int
    image_size: tuple[int, int]
    prep_ms: float  # median per image, one core: the faster of the two paths below
    prep_api_ms: float  # the API's Pillow path
    prep_worker_ms: float  # the worker's torchvision path (--preprocess worker)
    sweeps: list[Sweep]  # the configured threads first; on a CPU then one thread, unless that was it
    machine_limit_ips: float
    machine_limit: str  # how the limit was reached, for people
    # On a CPU with several cores: one one-thread process per core at once (module docstring)
    cores_at_once_ips: float | None = None

    @property
    def prep_all_cores_ips(self) -> float:
        """What every core could preprocess (the API's path where the worker's runs on the GPU)."""
        cpu_ms = self.prep_ms if self.device == "cpu" else self.prep_api_ms
        return self.cores * 1000.0 / cpu_ms


def api_input(body: bytes, spec: dict[str, Any], max_pixels: int) -> TensorData:
    """The API's preprocessing of one image (Pillow): decoded, resized and cropped to ``spec``."""
    return to_model_input(open_image(body, max_pixels), spec, max_pixels)


def time_preprocess(
    bodies: Sequence[bytes], spec: dict[str, object], max_pixels: int, n: int
) -> tuple[list[TensorData], float]:
    """The API's preprocessing of ``n`` images (cycling over ``bodies``), each timed on its own after
    one untimed image; returns the model inputs and the median seconds per image."""
    api_input(bodies[0], spec, max_pixels)
    inputs, times = [], []
    for i in range(n):
        start = time.perf_counter()
        inputs.append(api_input(bodies[i % len(bodies)], spec, max_pixels))
        times.append(time.perf_counter() - start)
    return inputs, statistics.median(times)


def jpeg_inputs(bodies: Sequence[bytes]) -> list[TensorData]:
    """The JPEGs among ``bodies`` as the worker's ``prepare`` takes them (other formats go the API's way)."""
    return [TensorData("jpeg", (len(b),), b) for b in bodies if b[:2] == b"\xff\xd8"]


def time_worker_preprocess(handler: TorchvisionClassifier, bodies: Sequence[bytes], n: int) -> tuple[list[Any], float]:
    """The worker's own preprocessing (``prepare``) of ``n`` JPEGs; what it made and the median
    seconds per image. On a CPU: decode, resize, crop and normalise, each image timed on its own
    after one untimed image, on this thread. On CUDA, as the worker's collector does it there: a
    batch of ``GPU_PREP_BATCH`` decoded by nvjpeg and cropped together on the GPU, timed to its
    end on the device, ``GPU_PREP_ROUNDS`` times (``n`` does not apply)."""
    jpegs = jpeg_inputs(bodies)
    if handler.device.type != "cpu":
        sync = _synchronizer(handler.device)
        chunk = [jpegs[k % len(jpegs)] for k in range(GPU_PREP_BATCH)]
        made = handler.prepare(chunk)  # the sweep's batches cycle over these crops
        sync()
        per_batch = []
        for _ in range(GPU_PREP_ROUNDS):
            start = time.perf_counter()
            handler.prepare(chunk)
            sync()
            per_batch.append(time.perf_counter() - start)
        return made, statistics.median(per_batch) / GPU_PREP_BATCH
    handler.prepare(jpegs[:1])
    prepared, times = [], []
    for i in range(n):
        start = time.perf_counter()
        prepared.extend(handler.prepare([jpegs[i % len(jpegs)]]))
        times.append(time.perf_counter() - start)
    return prepared, statistics.median(times)


def _synchronizer(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _step(handler: TorchvisionClassifier, batch: Sequence[Any]) -> None:
    with torch.inference_mode():
        handler.postprocess(handler.forward(handler.preprocess(batch)), [{"topk": 5}] * len(batch))


def _repeat(
    handler: TorchvisionClassifier, batch: Sequence[Any], min_s: float, sync: Callable[[], None]
) -> list[float]:
    """Run ``batch`` at least once and until ``min_s`` has passed; the seconds of each run."""
    sync()
    times: list[float] = []
    while not times or sum(times) < min_s:
        start = time.perf_counter()
        _step(handler, batch)
        sync()
        times.append(time.perf_counter() - start)
    return times


def time_batch(
    handler: TorchvisionClassifier, inputs: Sequence[Any], batch_size: int, cfg: InProcessConfig, prep_s: float
) -> BatchRow:
    """One batch size: warm-up, then the median time of a batch (robust to a neighbour's burst of CPU)."""
    batch = [inputs[i % len(inputs)] for i in range(batch_size)]
    sync = _synchronizer(handler.device)
    _repeat(handler, batch, cfg.warmup_s, sync)
    times = _repeat(handler, batch, cfg.duration_s, sync)
    per_batch_s = statistics.median(times)
    return BatchRow(
        batch_size=batch_size,
        iterations=len(times),
        model_ms=per_batch_s * 1000.0,
        model_ips=batch_size / per_batch_s,
        total_ips=1.0 / (prep_s + per_batch_s / batch_size),
    )


def sweep(
    handler: TorchvisionClassifier, inputs: Sequence[Any], cfg: InProcessConfig, prep_s: float, threads: int
) -> Sweep:
    """Every batch size with ``threads`` torch threads (the previous setting is restored)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return Sweep(threads, [time_batch(handler, inputs, b, cfg, prep_s) for b in cfg.batch_sizes])
    finally:
        torch.set_num_threads(before)


def best_one_thread(sweeps: Sequence[Sweep]) -> BatchRow:
    """The one-thread sweep's fastest batch size with preprocessing: the limit's unit."""
    one = next(s for s in sweeps if s.threads == 1)
    return max(one.rows, key=lambda r: r.total_ips)


def machine_limit(
    device: torch.device, sweeps: Sequence[Sweep], cores: int, api_prep_s: float, worker_prep_s: float
) -> tuple[float, str]:
    """The project's machine limit (see the module docstring), and how it was reached."""
    if device.type != "cpu":
        model = sweeps[0].best
        api = min(cores / api_prep_s, model.model_ips)  # every core preprocessing for the model
        gpu = min(1.0 / worker_prep_s, model.model_ips)  # the GPU decoding beside the model's passes
        how = f"model at batch {model.batch_size} on {device}, fed by "
        if gpu >= api:
            return gpu, how + f"JPEGs decoded on the GPU ({1.0 / worker_prep_s:.0f} img/s)"
        return api, how + f"{cores} cores preprocessing ({cores / api_prep_s:.0f} img/s)"
    best = best_one_thread(sweeps)
    return cores * best.total_ips, f"{cores} cores x {best.total_ips:.1f} img/s (one thread, batch {best.batch_size})"


def load_handler(cfg: InProcessConfig, device: torch.device) -> TorchvisionClassifier:
    """The worker's handler for ``cfg``'s model and options, set up on ``device``."""
    handler = TorchvisionClassifier(cfg.model, cfg.weights, cfg.dtype, cfg.channels_last, decode_jpeg=True)
    handler.fuse, handler.compile = cfg.fuse, cfg.compile
    handler.setup(device)
    return handler


def measure(cfg: InProcessConfig, progress: Callable[[str], None] | None = None) -> InProcessResult:
    """Load the model, time preprocessing and every batch size; see the module docstring."""
    device = resolve_device(cfg.device)
    if cfg.cuda_graphs:
        check_cuda_graphs(device, cfg.compile)
    if cfg.compile:
        allow_compiled_shapes(len(cfg.batch_sizes))
    handler = load_handler(cfg, device)
    if cfg.cuda_graphs:  # a graph for every batch size timed, as the worker has one per bucket
        use_cuda_graphs(handler, cfg.batch_sizes, lambda n: blank_batch(handler, n))
    bodies = [b.data for b in load_bodies(cfg.images or None, cfg.size)]
    n_prep = max(MIN_PREP_IMAGES, N_IMAGES, *cfg.batch_sizes)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # one core, like the API's Pillow
    try:
        api_inputs, api_prep_s = time_preprocess(bodies, handler.spec.to_dict(), cfg.max_pixels, n_prep)
        prepared, worker_prep_s = time_worker_preprocess(handler, bodies, n_prep)
    finally:
        torch.set_num_threads(before)
    prep_s = min(api_prep_s, worker_prep_s)
    # The model's step runs on what the faster path hands it, as in the worker: on a CPU, images
    # ``prepare`` already normalised (the step only stacks them); else the API's uint8 crops.
    inputs: list[Any] = prepared if worker_prep_s < api_prep_s else api_inputs
    threads = cfg.threads or torch.get_num_threads()
    thread_counts = [threads] if device.type != "cpu" or threads == 1 else [threads, 1]
    sweeps = []
    for t in thread_counts:
        if progress is not None:
            progress(f"timing {cfg.model} on {device} with {t} torch thread(s)...")
        sweeps.append(sweep(handler, inputs, cfg, prep_s, t))
    cores = os.cpu_count() or 1
    limit_ips, how = machine_limit(device, sweeps, cores, api_prep_s, worker_prep_s)
    at_once = None
    if device.type == "cpu" and cores > 1:
        best = best_one_thread(sweeps)
        if progress is not None:
            progress(f"timing {cores} one-thread processes at once, batch {best.batch_size}...")
        at_once = cores_at_once(cfg, cores, best.batch_size, "worker" if worker_prep_s < api_prep_s else "api")
    return InProcessResult(
        model=cfg.model,
        device=str(device),
        dtype=cfg.dtype,
        channels_last=cfg.channels_last,
        options=", ".join(o for o, on in _options(cfg) if on) or "eager",
        weights=handler.weights_source,
        cores=cores,
        image_size=cfg.size,
        prep_ms=prep_s * 1000.0,
        prep_api_ms=api_prep_s * 1000.0,
        prep_worker_ms=worker_prep_s * 1000.0,
        sweeps=sweeps,
        machine_limit_ips=limit_ips,
        machine_limit=how,
        cores_at_once_ips=at_once,
    )


def cores_at_once(cfg: InProcessConfig, cores: int, batch_size: int, prep: str) -> float:
    """Images a second of ``cores`` one-thread processes running the limit's loop at once: each
    loads the model, warms up and says so; all start on one signal and time the same window
    (``2 * cfg.duration_s``); their rates are summed. A process that fails raises, with its error."""
    # eager, as the processes always timed it: no torch.compile or CUDA graphs in them
    job = {"cfg": asdict(replace(cfg, compile=False, cuda_graphs=False)), "batch_size": batch_size, "prep": prep}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = os.environ | {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "worker.bench_inprocess", json.dumps(job)]
    with contextlib.ExitStack() as stack:
        # stderr to files: a pipe that nobody reads until the end could fill up and stall a process
        errs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in range(cores)]
        procs = [
            subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=e, text=True, env=env)
            for e in errs
        ]
        try:
            for p, e in zip(procs, errs):
                _expect_line(p, e, "ready")
            for p in procs:
                assert p.stdin is not None
                p.stdin.write("go\n")
                p.stdin.flush()
            return sum(float(_expect_line(p, e, "ips")) for p, e in zip(procs, errs))
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                p.wait()


def _expect_line(p: subprocess.Popen[str], err: IO[str], word: str) -> str:
    """What follows ``word`` on the next line ``p`` prints; if the line is not that, its error."""
    assert p.stdout is not None
    line = p.stdout.readline().split()
    if line[:1] == [word]:
        return " ".join(line[1:])
    p.kill()
    p.wait()
    err.seek(0)
    raise RuntimeError(f"a one-thread timing process failed: {err.read().strip()[-2000:] or line}")


def _one_core(job: dict[str, Any]) -> None:
    """One process of ``cores_at_once``: the limit's loop on one thread, timed after a "go" line."""
    torch.set_num_threads(1)
    logging.getLogger("worker.handler").setLevel(logging.ERROR)
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in job["cfg"].items()}
    cfg = InProcessConfig(**fields)  # JSON made its tuples lists
    handler = load_handler(cfg, torch.device("cpu"))
    bodies = [b.data for b in load_bodies(cfg.images or None, cfg.size)]
    spec, n = handler.spec.to_dict(), job["batch_size"]
    if job["prep"] == "worker":
        jpegs = jpeg_inputs(bodies)

        def prepare(i: int) -> list[Any]:
            return [x for k in range(i, i + n) for x in handler.prepare([jpegs[k % len(jpegs)]])]
    else:

        def prepare(i: int) -> list[Any]:
            return [api_input(bodies[k % len(bodies)], spec, cfg.max_pixels) for k in range(i, i + n)]

    def loop(seconds: float) -> float:
        """Batches of preprocessing then the model, at least one, until ``seconds``: images a second."""
        done, start = 0, time.perf_counter()
        while not done or time.perf_counter() - start < seconds:
            _step(handler, prepare(done))
            done += n
        return done / (time.perf_counter() - start)

    loop(cfg.warmup_s)
    print("ready", flush=True)
    sys.stdin.readline()
    print(f"ips {loop(2 * cfg.duration_s)}", flush=True)


def _options(cfg: InProcessConfig) -> tuple[tuple[str, bool], ...]:
    return (("BatchNorm folded", cfg.fuse), ("torch.compile", cfg.compile), ("CUDA graphs", cfg.cuda_graphs))


def sweep_table(s: Sweep) -> str:
    headers = ("batch", "model ms/batch", "model img/s", "with prep img/s")
    rows = [(str(r.batch_size), f"{r.model_ms:.2f}", f"{r.model_ips:.1f}", f"{r.total_ips:.1f}") for r in s.rows]
    return format_table(headers, rows)


def format_report(r: InProcessResult) -> str:
    layout = "channels_last" if r.channels_last else "contiguous"
    lines = [
        f"{r.model} on {r.device}, {r.dtype}, {layout}, {r.options}, {r.weights} weights; {r.cores} CPU cores",
        f"preprocessing of a {r.image_size[0]}x{r.image_size[1]} JPEG: API (Pillow, one core) "
        f"{r.prep_api_ms:.2f} ms/img, worker ({_worker_path(r.device)}) {r.prep_worker_ms:.2f} ms/img; the faster, "
        f"{r.prep_ms:.2f} ms/img, counts below",
        "model = the handler's preprocess + forward + postprocess on a batch; "
        "with prep = one thread doing both, one after the other",
    ]
    for s in r.sweeps:
        best = s.best
        lines += ["", f"torch threads: {s.threads}", sweep_table(s)]
        lines.append(
            f"best batch size: {best.batch_size} ({best.model_ips:.1f} img/s model, {best.total_ips:.1f} with prep)"
        )
    lines.append("")
    if r.device == "cpu":
        first = r.sweeps[0]
        best = max(first.rows, key=lambda row: row.total_ips)
        lines.append(
            f"one process, all {first.threads} threads: {best.total_ips:.1f} img/s with prep (batch {best.batch_size})"
        )
        lines.append(f"machine limit (one thread per core): {r.machine_limit_ips:.1f} img/s = {r.machine_limit}")
        if r.cores_at_once_ips is not None:
            lines.append(
                f"all {r.cores} cores at once (a one-thread process each, same batch): {r.cores_at_once_ips:.1f} img/s"
                f" = {r.cores_at_once_ips / r.machine_limit_ips:.2f} x the limit"
            )
    else:
        best = r.sweeps[0].best
        lines.append(f"preprocessing on all {r.cores} CPU cores (API): {r.prep_all_cores_ips:.1f} img/s")
        lines.append(f"JPEGs decoded and cropped on the GPU: {1000 / r.prep_worker_ms:.1f} img/s")
        lines.append(f"the model alone: {best.model_ips:.1f} img/s at batch {best.batch_size}")
        lines.append(f"machine limit: {r.machine_limit_ips:.1f} img/s ({r.machine_limit})")
    return "\n".join(lines)


def _worker_path(device: str) -> str:
    return "torchvision, one core" if device == "cpu" else f"nvjpeg on the GPU, {GPU_PREP_BATCH} a call"


def config_from_args(args: argparse.Namespace) -> InProcessConfig:
    return InProcessConfig(
        model=args.model,
        weights=args.weights,
        device=args.device,
        dtype=args.dtype,
        channels_last=args.channels_last,
        fuse=args.fuse,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
        batch_sizes=tuple(args.batch_sizes),
        duration_s=INPROCESS_DURATION_S if args.duration_s is None else args.duration_s,
        warmup_s=INPROCESS_WARMUP_S if args.warmup_s is None else args.warmup_s,
        threads=args.threads,
        size=args.size,
        images=tuple(args.images or ()),
    )


def run(args: argparse.Namespace) -> int:
    """``redbatch bench --in-process``: print the report, and write ``--json`` if asked."""
    cfg = config_from_args(args)
    if cfg.weights.lower() == "random":  # timing only: the handler's loud warning about predictions is noise here
        logging.getLogger("worker.handler").setLevel(logging.ERROR)
    result = measure(cfg, progress=lambda text: print(text, flush=True))
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(asdict(result) | {"prep_all_cores_ips": result.prep_all_cores_ips}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":  # a process of ``cores_at_once``
    _one_core(json.loads(sys.argv[1]))
