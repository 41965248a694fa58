"""Live workers as Redis shows them: ``<prefix>:workers`` (set of ids) and ``<prefix>:worker:<id>`` (hash).

The hash expires unless its worker renews it, so a member of the set whose hash is gone is dead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from common.keys import Keys


@dataclass(frozen=True)
class WorkerInfo:
    id: str
    model: str
    device: str
    max_batch_size: int
    spec: dict[str, Any]
    fields: dict[str, str]


def live_workers(r: redis.Redis, keys: Keys) -> list[WorkerInfo]:
    """Every live worker. Dead ids stay in the set: the worker that recovers their in-flight frames
    removes them, so that no dead worker's frames are forgotten."""
    ids = sorted(_s(m) for m in r.smembers(keys.workers()))
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for wid in ids:
        pipe.hgetall(keys.worker(wid))
    hashes = pipe.execute()
    out: list[WorkerInfo] = []
    for wid, h in zip(ids, hashes):
        info = _parse(wid, {_s(k): _s(v) for k, v in h.items()})
        if info is not None:
            out.append(info)
    return out


def worker_from_hash(wid: str, raw: dict[Any, Any]) -> WorkerInfo | None:
    """A worker's hash as HGETALL returns it (bytes or str); None when it is gone or partial."""
    return _parse(wid, {_s(k): _s(v) for k, v in raw.items()})


def _parse(wid: str, fields: dict[str, str]) -> WorkerInfo | None:
    try:
        return WorkerInfo(
            id=wid,
            model=fields["model"],
            device=fields.get("device", ""),
            max_batch_size=int(fields["max_batch_size"]),
            spec=json.loads(fields["spec"]),
            fields=fields,
        )
    except (KeyError, ValueError):
        return None  # gone, or a partial hash (only counters left): not a live worker


def _s(v: bytes | str) -> str:
    return v.decode() if isinstance(v, bytes) else v
