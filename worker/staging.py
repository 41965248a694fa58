"""A ring of preallocated image rows on the host, so a CPU worker's batch needs no stacking copy.

The collector thread writes each normalised image into the next free row of one tensor; images
that arrive one after another sit in consecutive rows, so a batch of them is a view of those rows
(``batch_view``) instead of a ``torch.stack`` copy on the forward pass's thread, the thread that
bounds a light model's served rate (docs/benchmarks.md).

A row is in use while any Python object refers to its view: the item that carries it through the
worker, the list handed to ``preprocess``, and the batch made from them (``batch_view`` keeps the
rows' views alive as long as the batch tensor lives). ``take`` skips nothing: when the next row in
the ring is still in use it returns None and the caller allocates as before, so the ring can only
make a batch cheaper, never wait or overwrite an image in use.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

import torch

MAX_BYTES = 256 * 1024 * 1024  # beyond this a worker keeps allocating per image (huge inputs or batches)


class Staging:
    def __init__(self, rows: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> None:
        self.base = torch.empty((rows, *shape), dtype=dtype)
        self._views = [self.base[i] for i in range(rows)]
        self._index = {id(v): i for i, v in enumerate(self._views)}
        self._next = 0
        self._lock = threading.Lock()

    @classmethod
    def sized(cls, rows: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Staging | None:
        """A ring of ``rows`` rows, or None when that would take more than ``MAX_BYTES``."""
        row_bytes = torch.empty((), dtype=dtype).element_size() * int(torch.Size(shape).numel())
        return cls(rows, shape, dtype) if 0 < rows * row_bytes <= MAX_BYTES else None

    def take(self) -> torch.Tensor | None:
        """The next row of the ring (contiguous, of the ring's shape and dtype), or None while it
        is still in use. When the row handed out last and the first row are both free (nothing
        waits: a lone request), the ring starts over at the first row, whose memory is still in
        cache, instead of walking on through cold rows."""
        with self._lock:
            if self._next and self._free(self._next - 1) and self._free(0):
                self._next = 0
            if not self._free(self._next):
                return None
            view = self._views[self._next]
            self._next = (self._next + 1) % len(self._views)
            return view

    def _free(self, i: int) -> bool:
        # Nothing beyond the ring's own list holds the row's view (that list and getrefcount's
        # argument make 2).
        return sys.getrefcount(self._views[i]) <= 2

    def batch_view(self, rows: Sequence[torch.Tensor]) -> torch.Tensor | None:
        """``torch.stack(rows)`` without a copy when ``rows`` are consecutive rows of this ring, in
        order; else None. Whoever uses the view must keep ``rows`` alive as long (``hold``)."""
        first = self._index.get(id(rows[0])) if rows else None
        if first is None or first + len(rows) > len(self._views):
            return None
        if any(self._views[first + k] is not r for k, r in enumerate(rows)):
            return None
        return self.base.narrow(0, first, len(rows))


def hold(batch: torch.Tensor, rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``batch`` carrying references to ``rows``: a view of ring rows keeps them in use while it lives."""
    batch._staged_rows = list(rows)  # type: ignore[attr-defined]
    return batch
