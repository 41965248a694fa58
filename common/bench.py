"""``redbatch bench``: closed-loop HTTP load against a running service, without torch.

For each concurrency level C, C client threads each hold one keep-alive connection and send the
next request as soon as the previous answer arrives. Requests that finish during the warm-up, or
after the measured window, are not counted; each thread stops after its first request that ends
past the window, so every level sends exactly one uncounted request per thread after the window.
Bodies are encoded once, before any clock starts, and each request is sent as bytes built once per
body (``KeepAlive``: its answer read with a hand-written scan of the status line and headers): the
client shares the machine with the service, so its own CPU cost must stay small. HTTPS goes
through ``http.client``.

``redbatch bench --in-process`` (the model's own limit, no HTTP) lives in ``worker.bench_inprocess``.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import math
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeGuard

import numpy as np
from PIL import Image

from common.client import content_type_of

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_CONCURRENCY = "1,4,16,64"
DEFAULT_BATCH_SIZES = "1,2,4,8,16,32,64"
HTTP_DURATION_S, HTTP_WARMUP_S = 10.0, 2.0
REQUEST_TIMEOUT_S = 60.0  # above the service's own deadline, so its 504 arrives before ours
N_IMAGES = 8
PERCENTILES = (50, 90, 99)


# ---------------------------------------------------------------------------------------------
# command line


def parse_int_list(text: str) -> list[int]:
    """``"1,4,16"`` -> ``[1, 4, 16]``: positive integers, comma-separated, kept in the given order."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more integers >= 1, e.g. 1,4,16")
    return values


def parse_size(text: str) -> tuple[int, int]:
    """``"640x480"`` -> ``(640, 480)`` (width, height)."""
    w, sep, h = text.lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit() or int(w) < 1 or int(h) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size WIDTHxHEIGHT, e.g. 640x480")
    return int(w), int(h)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--model", default="resnet18", help="model to load (HTTP: the served name; in-process: the architecture)")
    add("--images", nargs="+", metavar="FILE", help="image files to send (default: generated JPEGs of --size)")
    add("--size", type=parse_size, default=(640, 480), help="WIDTHxHEIGHT of the generated images (default 640x480)")
    add(
        "--duration-s",
        type=float,
        help="measured seconds per level (HTTP: 10 per concurrency; in-process: 1 per batch)",
    )
    add("--warmup-s", type=float, help="uncounted seconds before each level (HTTP: 2; in-process: 0.5)")
    add("--json", metavar="OUT.json", help="write every result to this file")
    http_ = parser.add_argument_group("HTTP load (default)")
    http_.add_argument("--url", default=DEFAULT_URL, help=f"the service's base URL (default {DEFAULT_URL})")
    http_.add_argument(
        "--concurrency", type=parse_int_list, default=DEFAULT_CONCURRENCY, help="client threads per level"
    )
    http_.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' when the service needs one")
    http_.add_argument("--plot", metavar="OUT_PREFIX", help="write PNG plots OUT_PREFIX-*.png (needs matplotlib)")
    http_.add_argument(
        "--limit",
        metavar="IMG_PER_S|FILE",
        help="the model's own limit, to print served / limit at each level: images a second, or the "
        "--json file of 'redbatch bench --in-process'",
    )
    local = parser.add_argument_group("in-process (the model's own limit, no HTTP; needs torch)")
    local.add_argument("--in-process", action="store_true", help="measure preprocessing and the model in this process")
    local.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    local.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    local.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    local.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True, help="fold BatchNorm into convs")
    local.add_argument("--compile", action="store_true", help="torch.compile the model (each batch size compiles once)")
    local.add_argument("--cuda-graphs", action="store_true", help="on CUDA, one CUDA graph per batch size, replayed")
    local.add_argument("--batch-sizes", type=parse_int_list, default=DEFAULT_BATCH_SIZES, help="batch sizes to time")
    local.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    local.add_argument("--weights", default="random", help="random (default; timing only), DEFAULT or a state_dict")


# ---------------------------------------------------------------------------------------------
# request bodies


@dataclass(frozen=True)
class Body:
    data: bytes
    content_type: str


def make_images(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    """``n`` distinct JPEGs of ``size``: smooth colour fields, a few blocks and sensor-like noise,
    so that they compress like photographs rather than like flat colour or pure noise."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = []
    for i in range(n):
        rng = np.random.default_rng(seed + i)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            fx, fy = rng.uniform(0.003, 0.03, 2)
            img[..., c] = 127 + 110 * np.sin(xx * fx + yy * fy + rng.uniform(0, 6.3))
        for _ in range(4):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
            img[y0 : y0 + h // 4, x0 : x0 + w // 4] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 8, img.shape)
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def load_bodies(paths: Sequence[str] | None, size: tuple[int, int]) -> list[Body]:
    datas = [Path(p).read_bytes() for p in paths] if paths else make_images(N_IMAGES, size)
    return [Body(d, content_type_of(d)) for d in datas]


# ---------------------------------------------------------------------------------------------
# the closed loop


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    headers: tuple[tuple[str, str], ...] = ()

    def connect(self, timeout_s: float = REQUEST_TIMEOUT_S) -> Client:
        """One client's connection (opened at its first request, reopened after an error)."""
        if self.scheme == "https":
            return StdlibClient(self, timeout_s)
        return KeepAlive(self, timeout_s)


class Client(Protocol):
    def post(self, body: Body) -> tuple[int, bytes]:
        """Send ``body`` to the predict route; the answer's status and body. Raises OSError,
        ``http.client.HTTPException`` or ValueError when the exchange fails (then call ``close``)."""
        ...

    def close(self) -> None: ...


MAX_LINE = 65536


class KeepAlive:
    """A keep-alive HTTP/1.1 connection for the bench's one kind of request, cheap per request:
    each body's request (line, headers, body) is built once and sent in one write; the answer's
    status line and headers are scanned by hand for Content-Length, chunked transfer and
    ``Connection: close``. ``http.client`` builds and checks every header of every request and
    parses the answer's headers with the email package."""

    def __init__(self, target: Target, timeout_s: float) -> None:
        self._target = target
        self._timeout_s = timeout_s
        self._sock: socket.socket | None = None
        self._rfile: Any = None
        self._requests: dict[int, bytes] = {}

    def _request(self, body: Body) -> bytes:
        key = id(body.data)
        if key not in self._requests:
            t = self._target
            host = f"[{t.host}]" if ":" in t.host else t.host
            lines = [
                f"POST {t.path} HTTP/1.1",
                f"Host: {host}:{t.port}",
                f"Content-Type: {body.content_type}",
                f"Content-Length: {len(body.data)}",
                *(f"{k}: {v}" for k, v in t.headers),
            ]
            self._requests[key] = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body.data
        return self._requests[key]

    def post(self, body: Body) -> tuple[int, bytes]:
        if self._sock is None:
            self._sock = socket.create_connection((self._target.host, self._target.port), self._timeout_s)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._rfile = self._sock.makefile("rb")
        self._sock.sendall(self._request(body))
        return self._answer()

    def _answer(self) -> tuple[int, bytes]:
        f = self._rfile
        parts = f.readline(MAX_LINE).split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
            raise http.client.BadStatusLine(repr(b" ".join(parts)[:80]))
        status = int(parts[1])
        length: int | None = None
        chunked, close = False, parts[0] == b"HTTP/1.0"
        while (line := f.readline(MAX_LINE)) not in (b"\r\n", b"\n"):
            if not line:
                raise http.client.IncompleteRead(b"", None)
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            data = self._chunks()
        elif length is not None:
            data = self._exactly(length)
        else:  # no length: the body runs to the end of the connection
            data, close = f.read(), True
        if close:
            self.close()
        return status, data

    def _exactly(self, n: int) -> bytes:
        data: bytes = self._rfile.read(n)
        if len(data) < n:
            raise http.client.IncompleteRead(data, n - len(data))
        return data

    def _chunks(self) -> bytes:
        parts = []
        while size := int(self._rfile.readline(MAX_LINE).split(b";", 1)[0], 16):
            parts.append(self._exactly(size))
            self._rfile.readline(MAX_LINE)  # the CRLF after each chunk
        while self._rfile.readline(MAX_LINE) not in (b"\r\n", b"\n", b""):  # trailers
            pass
        return b"".join(parts)

    def close(self) -> None:
        if self._sock is not None:
            self._rfile.close()
            self._sock.close()
            self._sock = self._rfile = None


class StdlibClient:
    """``http.client``'s connection behind the same two calls (for HTTPS)."""

    def __init__(self, target: Target, timeout_s: float) -> None:
        self._target = target
        self._conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout_s)

    def post(self, body: Body) -> tuple[int, bytes]:
        headers = {"Content-Type": body.content_type, **dict(self._target.headers)}
        self._conn.request("POST", self._target.path, body=body.data, headers=headers)
        resp = self._conn.getresponse()
        return resp.status, resp.read()  # read to the end, or the connection cannot be reused

    def close(self) -> None:
        self._conn.close()


def target_for(url: str, model: str, api_key: str | None = None) -> Target:
    """The predict route of ``model`` on the service at ``url`` (``http://host:port[/base]``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url {url!r}: expected http://HOST:PORT")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = f"{parts.path.rstrip('/')}/v1/models/{urllib.parse.quote(model, safe='')}/predict"
    headers = (("Authorization", f"Bearer {api_key}"),) if api_key else ()
    return Target(parts.scheme, parts.hostname, port, path, headers)


@dataclass(frozen=True)
class Sample:
    latency_s: float
    status: int  # 0: the connection failed or timed out
    batch_size: int | None


@dataclass
class ClientLog:
    """What one client thread saw: the requests that ended inside the window, and how many did not."""

    counted: list[Sample] = field(default_factory=list)
    uncounted: int = 0


def post(conn: Client, body: Body) -> tuple[int, int | None]:
    """One request on a kept-alive connection: (status, the response's batch_size or None)."""
    status, data = conn.post(body)
    if status != 200:
        return status, None
    batch = json.loads(data).get("batch_size")
    return status, int(batch) if isinstance(batch, int) else None


def client_loop(target: Target, bodies: Sequence[Body], first: int, t0: float, t1: float, log: ClientLog) -> None:
    """Send requests back to back until one ends after ``t1``; count those that end in [t0, t1]."""
    conn = target.connect()
    i = first
    try:
        while True:
            body = bodies[i % len(bodies)]
            i += 1
            start = time.perf_counter()
            try:
                status, batch = post(conn, body)
            except (OSError, http.client.HTTPException, ValueError):
                status, batch = 0, None
                conn.close()  # the next request reconnects
            end = time.perf_counter()
            if end > t1:
                log.uncounted += 1
                return
            if end >= t0:
                log.counted.append(Sample(end - start, status, batch))
            else:
                log.uncounted += 1
    finally:
        conn.close()


@dataclass(frozen=True)
class LevelResult:
    """One concurrency level. ``ok_per_s`` and the latencies count 200 responses only; ``errors``
    are the other statuses and failed connections; ``mean_batch_size`` is, over the 200 responses,
    the size of the forward pass that served each (a mean over requests, not over batches)."""

    concurrency: int
    duration_s: float
    requests: int
    ok: int
    errors: int
    uncounted: int
    ok_per_s: float
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    mean_batch_size: float | None
    batch_sizes: dict[int, int]
    statuses: dict[int, int]


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) of ascending values, interpolating linearly between the
    closest ranks (numpy's default method); None for no values."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(concurrency: int, duration_s: float, samples: Sequence[Sample], uncounted: int) -> LevelResult:
    ok = [s for s in samples if s.status == 200]
    latencies_ms = sorted(s.latency_s * 1000.0 for s in ok)
    p50, p90, p99 = (percentile(latencies_ms, q) for q in PERCENTILES)
    batches = [s.batch_size for s in ok if s.batch_size is not None]
    return LevelResult(
        concurrency=concurrency,
        duration_s=duration_s,
        requests=len(samples),
        ok=len(ok),
        errors=len(samples) - len(ok),
        uncounted=uncounted,
        ok_per_s=len(ok) / duration_s,
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_batch_size=sum(batches) / len(batches) if batches else None,
        batch_sizes=dict(sorted(Counter(batches).items())),
        statuses=dict(sorted(Counter(s.status for s in samples).items())),
    )


Progress = Callable[[str], None]


def run_level(
    target: Target,
    bodies: Sequence[Body],
    concurrency: int,
    warmup_s: float,
    duration_s: float,
    progress: Progress | None = None,
) -> LevelResult:
    """``concurrency`` closed-loop clients for ``warmup_s`` + ``duration_s``; returns when all stopped."""
    start = time.perf_counter()
    t0 = start + warmup_s
    t1 = t0 + duration_s
    logs = [ClientLog() for _ in range(concurrency)]
    threads = [
        threading.Thread(target=client_loop, args=(target, bodies, k, t0, t1, log), daemon=True, name=f"bench-{k}")
        for k, log in enumerate(logs)
    ]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive():
            t.join(timeout=0.25)
            if progress is not None:
                progress(progress_text(concurrency, start, t0, t1, logs))
    samples = [s for log in logs for s in log.counted]
    return summarize(concurrency, duration_s, samples, sum(log.uncounted for log in logs))


BAR_CELLS = 30


def progress_text(
    concurrency: int, start: float, t0: float, t1: float, logs: Sequence[ClientLog], now: float | None = None
) -> str:
    """The status line of a level that started at ``start``, measures from ``t0`` to ``t1``: a bar
    over the whole level (``-`` the warm-up, ``#`` the measured part), then what is going on."""
    now = time.perf_counter() if now is None else now
    total = max(t1 - start, 1e-9)
    warm = round(BAR_CELLS * (t0 - start) / total)
    done_cells = min(max(round(BAR_CELLS * (now - start) / total), 0), BAR_CELLS)
    bar = ("-" * min(warm, done_cells) + "#" * max(done_cells - warm, 0)).ljust(BAR_CELLS, ".")
    head = f"concurrency {concurrency} [{bar}] "
    if now < t0:
        return head + f"warming up, {t0 - now:4.1f} s left"
    if now > t1:
        return head + "waiting for the last answers"
    done = sum(len(log.counted) for log in logs)
    errors = sum(1 for log in logs for s in log.counted if s.status != 200)
    return head + f"{now - t0:5.1f}/{t1 - t0:.1f} s, {done} requests, {errors} errors"


class StderrProgress:
    """A single status line on stderr, rewritten in place; silent when stderr is not a terminal."""

    def __init__(self) -> None:
        self.enabled = sys.stderr.isatty()
        self.width = 0

    def __call__(self, text: str) -> None:
        if self.enabled:
            sys.stderr.write("\r" + text.ljust(self.width))
            sys.stderr.flush()
            self.width = len(text)

    def clear(self) -> None:
        if self.enabled and self.width:
            sys.stderr.write("\r" + " " * self.width + "\r")
            sys.stderr.flush()
            self.width = 0


# ---------------------------------------------------------------------------------------------
# reporting


@dataclass(frozen=True)
class Limit:
    """The model's own limit that served rates are reported against (``--limit``)."""

    ips: float  # images a second
    source: str  # where it came from, for people
    model: str | None = None  # the architecture it was measured for (from an --in-process file)

    def share(self, rate: float) -> float:
        """``rate`` (requests a second) over the limit."""
        return rate / self.ips


def _positive(x: object) -> TypeGuard[float]:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def parse_limit(text: str) -> Limit:
    """``--limit``: images a second, or the ``--json`` file of ``redbatch bench --in-process``
    (its ``machine_limit_ips``). Raises ValueError with a message for people."""
    try:
        ips = float(text)
    except ValueError:
        return _limit_file(text)
    if not _positive(ips):
        raise ValueError(f"--limit {text}: expected images a second above 0, or an --in-process --json file")
    return Limit(ips, f"{ips:g} img/s")


def _limit_file(path: str) -> Limit:
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ValueError(f"--limit {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"--limit {path}: not a JSON file") from None
    ips = doc.get("machine_limit_ips") if isinstance(doc, dict) else None
    if not _positive(ips):
        raise ValueError(
            f"--limit {path}: no machine limit in it (write one with 'redbatch bench --in-process --json FILE')"
        )
    named = {k: doc[k] for k in ("model", "device", "dtype") if isinstance(doc.get(k), str)}
    return Limit(float(ips), f"{ips:.1f} img/s ({Path(path).name}: {', '.join(named.values())})", named.get("model"))


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns right-aligned to their widest cell, two spaces apart; a dashed line under the header."""
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    lines = ["  ".join(str(c).rjust(w) for c, w in zip(row, widths)) for row in (headers, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(levels: Sequence[LevelResult], limit: Limit | None = None) -> str:
    """One row a level; with ``limit``, a last column: req/s over the limit's images a second."""
    headers = ("concurrency", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "mean batch")
    rows = [
        (
            str(r.concurrency),
            fmt(r.ok_per_s),
            fmt(r.p50_ms),
            fmt(r.p90_ms),
            fmt(r.p99_ms),
            str(r.errors),
            fmt(r.mean_batch_size, 2),
            *([fmt(limit.share(r.ok_per_s), 2)] if limit else []),
        )
        for r in levels
    ]
    return format_table((*headers, *(["served/limit"] if limit else [])), rows)


def error_lines(levels: Sequence[LevelResult]) -> list[str]:
    """``concurrency 64: 503 x 12, 0 (connection) x 1`` for each level that had errors."""
    out = []
    for r in levels:
        parts = [f"{'0 (connection)' if code == 0 else code} x {n}" for code, n in r.statuses.items() if code != 200]
        if parts:
            out.append(f"errors at concurrency {r.concurrency}: " + ", ".join(parts))
    return out


def write_json(path: str, meta: dict[str, Any], levels: Sequence[LevelResult], limit: Limit | None = None) -> None:
    """``meta`` and every level; with ``limit``, its figure and source, and each level's
    ``served_over_limit``."""
    rows = [asdict(r) | ({"served_over_limit": limit.share(r.ok_per_s)} if limit else {}) for r in levels]
    extra = {"limit_ips": limit.ips, "limit": limit.source} if limit else {}
    Path(path).write_text(json.dumps({**meta, **extra, "levels": rows}, indent=2) + "\n")


def write_plots(prefix: str, levels: Sequence[LevelResult], limit: Limit | None = None) -> list[str] | None:
    """``prefix-load.png`` (throughput, with ``limit`` as a line, and latency percentiles vs
    concurrency) and ``prefix-batches.png`` (batch-size histogram per level); None when
    matplotlib is missing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    xs = [r.concurrency for r in levels]
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_rps, ax_lat = fig.subplots(1, 2)
    ax_rps.plot(xs, [r.ok_per_s for r in levels], marker="o", label="served")
    if limit:
        ax_rps.axhline(limit.ips, linestyle="--", color="grey", label=f"limit {limit.ips:.0f} img/s")
        ax_rps.legend()
    ax_rps.set(xlabel="concurrency", ylabel="requests/s (200 only)", title="throughput", xscale="log", ylim=(0, None))
    for q in PERCENTILES:
        ys = [getattr(r, f"p{q}_ms") for r in levels]
        ax_lat.plot(xs, [math.nan if y is None else y for y in ys], marker="o", label=f"p{q}")
    ax_lat.set(xlabel="concurrency", ylabel="latency ms", title="latency", xscale="log", ylim=(0, None))
    ax_lat.legend()
    for ax in (ax_rps, ax_lat):
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    load_png = f"{prefix}-load.png"
    fig.savefig(load_png, dpi=100)
    return [load_png, _plot_batches(prefix, levels)]


def _plot_batches(prefix: str, levels: Sequence[LevelResult]) -> str:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    for r in levels:
        total = sum(r.batch_sizes.values()) or 1
        sizes = sorted(r.batch_sizes)
        ax.plot(sizes, [r.batch_sizes[s] / total for s in sizes], marker="o", label=f"concurrency {r.concurrency}")
    ax.set(
        xlabel="batch size that served the request", ylabel="fraction of requests", title="batch sizes", ylim=(0, None)
    )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    path = f"{prefix}-batches.png"
    fig.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------
# entry point


def run(args: argparse.Namespace) -> int:
    """``redbatch bench`` over HTTP: print the table, and write ``--json`` / ``--plot`` if asked."""
    try:
        target = target_for(args.url, args.model, args.api_key)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    duration_s = HTTP_DURATION_S if args.duration_s is None else args.duration_s
    warmup_s = HTTP_WARMUP_S if args.warmup_s is None else args.warmup_s
    if duration_s <= 0 or warmup_s < 0:
        print("--duration-s must be above 0 and --warmup-s at least 0", file=sys.stderr)
        return 2
    try:
        limit = parse_limit(args.limit) if args.limit else None
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    bodies = load_bodies(args.images, args.size)
    mean_kb = sum(len(b.data) for b in bodies) / len(bodies) / 1024
    print(
        f"bench {args.model} at {args.url}: {len(bodies)} images (mean {mean_kb:.0f} KB), "
        f"{duration_s:g} s per level after {warmup_s:g} s of warm-up"
    )
    if limit:
        print(f"limit: {limit.source}")
        if limit.model and limit.model != args.model:
            print(f"note: the limit was measured for {limit.model}, and the served model is {args.model}")
    progress = StderrProgress()
    levels = []
    for c in args.concurrency:
        levels.append(run_level(target, bodies, c, warmup_s, duration_s, progress))
        progress.clear()
    print(results_table(levels, limit))
    print("req/s and latencies count 200 responses; errors are other statuses and failed connections")
    for line in error_lines(levels):
        print(line)
    meta = {"url": args.url, "model": args.model, "duration_s": duration_s, "warmup_s": warmup_s}
    _write_outputs(args, meta | {"images": args.images or f"{len(bodies)} generated {args.size}"}, levels, limit)
    return 0


def _write_outputs(
    args: argparse.Namespace, meta: dict[str, Any], levels: Sequence[LevelResult], limit: Limit | None
) -> None:
    if args.json:
        write_json(args.json, meta, levels, limit)
        print(f"wrote {args.json}")
    if args.plot:
        paths = write_plots(args.plot, levels, limit)
        print("matplotlib is not installed: plots skipped" if paths is None else "wrote " + ", ".join(paths))
