"""``redbatch predict IMAGE...``: classify images with a running service and print the top-k classes.

Images are sent concurrently (``--concurrency``, so the service can batch them) through
``common.client.Client``; the report lists them in the order given. Exit status 1 if any failed.
``--timing`` adds a line per image: this client's wall time and where the service says it went
(its ``Server-Timing`` parts, and ``http``: what they leave of the client's time).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from common.client import DEFAULT_URL, Client, Prediction
from common.errors import ModelNotFound, RedbatchError

Outcome = Prediction | str  # a prediction, or why there is none


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("images", nargs="+", metavar="IMAGE", help="JPEG, PNG or WebP files ('-' reads one from stdin)")
    add("--url", default=DEFAULT_URL, help=f"the service's base URL (default {DEFAULT_URL})")
    add("--model", help="the served model's name (default: the only model the service serves)")
    add("--topk", type=int, default=5, help="classes to show per image, 1 to 100 (default 5)")
    add("--api-key", help="sent as 'Authorization: Bearer KEY' when the service needs one")
    add("--timeout-ms", type=int, help="ask the service for a shorter deadline (X-Request-Timeout-Ms)")
    add("--concurrency", type=int, default=8, help="images in flight at once (default 8)")
    add("--timing", action="store_true", help="show where each request's time went (the service's Server-Timing)")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    with Client(args.url, api_key=args.api_key) as client:
        try:
            model = args.model or _only_model(client)
        except RedbatchError as exc:
            print(f"redbatch predict: {exc.code}: {exc.message}", file=sys.stderr)
            return 1

        def one(name: str) -> Outcome:
            return classify(client, name, model, args.topk, args.timeout_ms)

        with ThreadPoolExecutor(max(1, min(args.concurrency, len(args.images)))) as pool:
            outcomes = list(pool.map(one, args.images))
    out.write(format_report(list(zip(args.images, outcomes)), timing=args.timing))
    failed = sum(not isinstance(o, Prediction) for o in outcomes)
    if failed:
        print(f"redbatch predict: {failed} of {len(outcomes)} images failed", file=sys.stderr)
    return 1 if failed else 0


def classify(client: Client, name: str, model: str, topk: int, timeout_ms: int | None) -> Outcome:
    try:
        data = sys.stdin.buffer.read() if name == "-" else Path(name).read_bytes()
    except OSError as exc:
        return f"cannot read: {exc.strerror or exc}"
    try:
        return client.predict(data, model, topk=topk, timeout_ms=timeout_ms)
    except RedbatchError as exc:
        return f"{exc.code}: {exc.message}"


def format_report(results: Sequence[tuple[str, Outcome]], timing: bool = False) -> str:
    """One block per image: a heading line, with ``timing`` a line of where its time went, then one
    aligned line per class (index, label, score)."""
    preds = [p for _, o in results if isinstance(o, Prediction) for p in o.predictions]
    index_w = max((len(str(p.index)) for p in preds), default=1)
    label_w = max((len(p.label) for p in preds), default=1)
    blocks = []
    for name, got in results:
        if not isinstance(got, Prediction):
            blocks.append(f"{name}: error {got}")
            continue
        lines = [f"{name}: {got.model}, batch {_num(got.batch_size)}, queue {_num(got.queue_ms)} ms, "
                 f"infer {_num(got.infer_ms)} ms"]  # fmt: skip
        if timing:
            lines.append(format_timing(got))
        lines += [f"  {p.index:>{index_w}}  {p.label:<{label_w}}  {p.score:.4f}" for p in got.predictions]
        blocks.append("\n".join(lines))
    return "\n".join(blocks) + "\n"


def format_timing(p: Prediction) -> str:
    """``  time 8.10 ms: api 0.20, queue 0.71, prep 1.88, batch 0.12, infer 4.62, http 0.57``: this
    client's wall time, then the service's parts in its order and what they leave of it."""
    parts = [*p.timing.items(), ("http", p.http_ms)] if p.timing else []
    split = ", ".join(f"{name} {ms:.2f}" for name, ms in parts if ms is not None)
    total = "?" if p.total_ms is None else f"{p.total_ms:.2f}"
    return f"  time {total} ms" + (f": {split}" if split else " (the service sent no Server-Timing)")


def _only_model(client: Client) -> str:
    names = sorted(str(m["name"]) for m in client.models())
    if len(names) == 1:
        return names[0]
    if not names:
        raise ModelNotFound("the service serves no model yet (no live worker)")
    raise ModelNotFound(f"the service serves {', '.join(names)}: choose one with --model")


def _num(v: float | None) -> str:
    if v is None:
        return "?"
    return f"{v:g}" if isinstance(v, int) else f"{v:.1f}"
