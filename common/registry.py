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
    """Every live worker; forgets the ids of dead ones as a side effect (SREM)."""
    ids = sorted(_s(m) for m in r.smembers(keys.workers()))
    if not ids:
        return []
    pipe = r.pipeline(transaction=False)
    for wid in ids:
        pipe.hgetall(keys.worker(wid))
    hashes = pipe.execute()
    out: list[WorkerInfo] = []
    dead: list[str] = []
    for wid, h in zip(ids, hashes):
        fields = {_s(k): _s(v) for k, v in h.items()}
        info = _parse(wid, fields)
        if info is None:
            dead.append(wid)
        else:
            out.append(info)
    if dead:
        r.srem(keys.workers(), *dead)
    return out


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
