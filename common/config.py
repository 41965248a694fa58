"""Settings: the only place the environment is read.

Every field ``foo_bar`` is read from ``REDBATCH_FOO_BAR`` (``REDIS_URL`` is accepted for ``redis_url``)
and can be overridden by the CLI flag ``--foo-bar``. Precedence: flag > environment > default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.keys import Keys

ENV_PREFIX = "REDBATCH_"

_HELP = {
    "redis_url": "Redis DSN: redis://[user:pass@]host:port/db, rediss:// for TLS",
    "prefix": "prefix of every Redis key",
    "request_timeout_s": "deadline of a request, from its arrival at the API",
    "reply_ttl_s": "TTL of a reply key that nobody reads (the API gave up)",
    "max_queue_length": "queue length above which the API answers 503 + Retry-After",
    "max_body_bytes": "largest request body the API reads (413 above)",
    "max_image_pixels": "largest image, in pixels, the API decodes (413 above)",
    "model_cache_s": "how long an API process caches the list of live models",
    "api_keys": "comma-separated keys; when set, /v1 routes need 'Authorization: Bearer KEY'",
    "bind": "HOST:PORT the API listens on",
    "api_workers": "gunicorn worker processes",
    "api_threads": "threads per gunicorn process under gthread (each holds one waiting request)",
    "api_connections": "connections one gunicorn process holds at once under gevent (idle keep-alive ones included)",
    "api_worker_class": "gunicorn worker class: gevent_pywsgi (gevent's HTTP server in gunicorn's gevent worker: "
    "one OS thread, a greenlet per connection, the least CPU per request), gevent (the same with gunicorn's "
    "HTTP parser) or gthread (a thread per waiting request)",
    "model": "torchvision architecture (resnet18, ...) or your own model as package.module:factory",
    "model_name": "name to serve the model under (default: the architecture)",
    "weights": "PATH to a state_dict, DEFAULT (torchvision pretrained), random, or auto (DEFAULT, else random)",
    "device": "cpu, cuda, cuda:N or auto",
    "dtype": "float32, float16 or bfloat16 for the forward pass",
    "max_batch_size": "most items in one forward pass",
    "window_ms": "longest a partial batch waits for more items, from its first item's arrival",
    "preprocess": "auto (worker on CUDA, api on a CPU); worker: JPEGs travel encoded and the worker "
    "decodes them (batched with nvjpeg on CUDA; as they arrive on a CPU: faster, within a grey level of "
    "Pillow); api: the API decodes and crops every image exactly as the preset does on a PIL image",
    "batch_buckets": "pad each batch up to a power of two (fewer shapes for cuDNN): auto (on CUDA only), on, off",
    "heartbeat_s": "how often a worker renews its registration",
    "worker_ttl_s": "a worker whose registration is older than this is dead",
    "torch_threads": "torch intra-op threads (0: torch's default)",
    "adaptive_threads": "on a CPU, time every batch size on one torch thread and on all of them at start-up and "
    "run each size the faster way when it runs alone (small batches lose more to waking threads than they "
    "gain); a pass with work waiting behind it runs on one thread, the other core decoding that work",
    "lanes": "forward passes that may run at once on a CPU, each on one torch thread while another runs; "
    "a second starts only with a full batch; a pass with the others idle and nothing waiting behind it "
    "runs on the thread plan's count "
    "(0: auto: one per torch thread where the forward pass costs at least 2x a JPEG's preprocessing per "
    "image, both timed at start-up on one thread; else 1, and 1 on CUDA or with --compile)",
    "channels_last": "run the model in channels_last memory format",
    "fuse": "fold each BatchNorm into the convolution before it (inference only; same answers, fewer passes)",
    "compile": "torch.compile the model (inductor); every batch size the worker runs is compiled before it is ready",
    "cuda_graphs": "on CUDA, capture the forward pass as a CUDA graph per batch bucket at start-up and replay it "
    "(one launch instead of one per kernel: small batches stop being bound by the CPU issuing kernels)",
    "instances": "worker processes for this model on this device, each with its own copy of the model, taking "
    "from the same queue (Triton's instance count): on a GPU one process's Python per request is the bound "
    "long before the GPU is; on a CPU each gets an equal share of the cores unless --torch-threads is set",
    "metrics_port": "port of the worker's Prometheus /metrics (all interfaces; 0: off; with --instances, "
    "every instance's metrics added up)",
    "log_level": "DEBUG, INFO, WARNING or ERROR",
}


# Which settings each command takes as flags (kept here so that reading them never imports torch).
API_FLAGS = (
    "redis_url", "prefix", "bind", "api_workers", "api_worker_class", "api_threads", "api_connections",
    "request_timeout_s", "reply_ttl_s", "max_queue_length", "max_body_bytes", "max_image_pixels", "model_cache_s",
    "api_keys", "log_level",
)  # fmt: skip
WORKER_FLAGS = (
    "redis_url", "prefix", "model", "model_name", "weights", "device", "dtype", "max_batch_size",
    "window_ms", "preprocess", "batch_buckets", "heartbeat_s", "worker_ttl_s", "reply_ttl_s",
    "request_timeout_s", "torch_threads", "adaptive_threads", "lanes", "channels_last", "fuse", "compile",
    "cuda_graphs", "instances", "metrics_port", "log_level",
)  # fmt: skip


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    prefix: str = "redbatch"
    # api
    request_timeout_s: float = 10.0
    reply_ttl_s: float = 30.0
    max_queue_length: int = 1024
    max_body_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    model_cache_s: float = 1.0
    api_keys: str = ""
    bind: str = "127.0.0.1:8000"
    api_workers: int = 2
    api_threads: int = 64
    api_worker_class: str = "gevent_pywsgi"
    api_connections: int = 1000
    # worker
    model: str = "resnet18"
    model_name: str = ""
    weights: str = "DEFAULT"
    device: str = "auto"
    dtype: str = "float32"
    max_batch_size: int = 32
    window_ms: float = 2.0
    preprocess: str = "auto"
    batch_buckets: str = "auto"
    heartbeat_s: float = 2.0
    worker_ttl_s: float = 10.0
    torch_threads: int = 0
    adaptive_threads: bool = True
    lanes: int = 0
    channels_last: bool = True
    fuse: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    instances: int = 1
    metrics_port: int = 0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from ``REDBATCH_*`` variables (and ``REDIS_URL``); raises ValueError on a bad value."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is None and f.name == "redis_url":
                raw = env.get("REDIS_URL")
            if raw is not None:
                values[f.name] = _parse(f.name, f.type, raw)
        return cls(**values)

    def __repr__(self) -> str:  # never print secrets: keys, and a password inside the Redis URL
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["api_keys"] = f"<{len(self.api_key_list)} keys>"
        shown["redis_url"] = redact_url(self.redis_url)
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def replace(self, **overrides: Any) -> Settings:
        """A copy with the given fields changed; ``None`` values are ignored (flags not given)."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    @property
    def served_name(self) -> str:
        """The name clients use: ``model_name``, else the architecture, else an import string's factory name."""
        return self.model_name or self.model.rsplit(":", 1)[-1]


def add_flags(parser: argparse.ArgumentParser, names: Iterable[str]) -> None:
    """Add ``--foo-bar`` flags for the named settings; an absent flag leaves the setting alone."""
    types = {f.name: f.type for f in fields(Settings)}
    for name in names:
        flag = "--" + name.replace("_", "-")
        env = ENV_PREFIX + name.upper()
        help_ = f"{_HELP.get(name, '')} [env {env}]"
        if types[name] in ("bool", bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, type=_caster(types[name]), default=None, help=help_)


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> Settings:
    names = {f.name for f in fields(Settings)}
    return Settings.from_env(env).replace(**{k: v for k, v in vars(args).items() if k in names})


def redact_url(url: str) -> str:
    """``url`` with any user and password replaced by ``***``."""
    if "@" not in url or "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


def _caster(type_name: Any) -> Any:
    return {"int": int, "float": float, "str": str}.get(str(type_name), str)


def _parse(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    try:
        if kind == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return _caster(kind)(raw)
    except ValueError:
        raise ValueError(f"{ENV_PREFIX}{name.upper()}={raw!r} is not a valid {kind}") from None
