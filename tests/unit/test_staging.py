"""The host ring a CPU worker normalises images into: rows reused only once nothing refers to
them, and a batch of consecutive rows as a view instead of a copy."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from worker.staging import MAX_BYTES, Staging, hold  # noqa: E402


def test_rows_go_round_the_ring_and_one_in_use_is_never_handed_out_again() -> None:
    ring = Staging(3, (2, 2, 3))
    a, b, c = ring.take(), ring.take(), ring.take()
    assert a is not None and b is not None and c is not None
    assert a.data_ptr() != b.data_ptr() != c.data_ptr() and a.is_contiguous()
    assert ring.take() is None  # back at a, which is still held
    del a
    again = ring.take()
    assert again is not None and again.data_ptr() == ring.base[0].data_ptr()
    assert ring.take() is None  # b is held


def test_a_lone_image_reuses_the_first_row_while_images_that_wait_take_the_next() -> None:
    ring = Staging(4, (2, 2, 3))
    first = ring.base[0].data_ptr()
    a = ring.take()
    assert a is not None and a.data_ptr() == first
    del a  # answered before the next arrives
    b = ring.take()
    assert b is not None and b.data_ptr() == first  # back at the first row, still in cache
    c = ring.take()  # b still waits: the next row, so the two stay consecutive
    assert c is not None and c.data_ptr() == ring.base[1].data_ptr()


def test_a_batch_of_consecutive_rows_is_a_view_and_holds_its_rows() -> None:
    ring = Staging(4, (2, 2, 3))
    rows = [ring.take() for _ in range(3)]
    for i, r in enumerate(rows):
        assert r is not None
        r.fill_(float(i))
    batch = ring.batch_view(rows)  # type: ignore[arg-type]
    assert batch is not None and torch.equal(batch, torch.stack(rows))  # type: ignore[arg-type]
    assert batch.data_ptr() == rows[0].data_ptr()  # type: ignore[union-attr]
    batch = hold(batch, rows)  # type: ignore[arg-type]
    last = ring.take()
    del rows
    assert ring.take() is None  # row 0 is still in the live batch
    del batch
    assert ring.take() is not None  # now it is free
    assert last is not None


def test_rows_out_of_order_or_not_from_the_ring_are_stacked_as_before() -> None:
    ring = Staging(4, (2, 2, 3))
    a, b = ring.take(), ring.take()
    assert ring.batch_view([b, a]) is None  # type: ignore[list-item]
    assert ring.batch_view([a, torch.zeros(2, 2, 3)]) is None  # type: ignore[list-item]
    assert ring.batch_view([]) is None


def test_a_ring_beyond_the_memory_cap_is_not_made() -> None:
    assert Staging.sized(4, (224, 224, 3)) is not None
    assert Staging.sized(MAX_BYTES // (224 * 224 * 3 * 4) + 1, (224, 224, 3)) is None


def test_a_staged_handler_gives_the_same_batch_without_a_copy() -> None:
    from common.protocol import TensorData
    from worker.handler import TorchvisionClassifier

    handler = TorchvisionClassifier("resnet18", "random")
    handler.setup(torch.device("cpu"))
    inputs = [TensorData("uint8", handler.spec.shape, bytes([v]) * (224 * 224 * 3)) for v in (0, 100, 255)]
    want = handler.preprocess(handler.prepare(inputs))
    handler.stage(8)
    prepared = handler.prepare(inputs)
    got = handler.preprocess(prepared)
    assert torch.equal(got, want) and got.is_contiguous(memory_format=torch.channels_last)
    assert got.data_ptr() == prepared[0].data_ptr()  # a view of the ring's rows: nothing stacked
