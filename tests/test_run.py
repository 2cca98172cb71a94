"""One epoch of stages 2-6 wired together (EpochRun), on fake blocks: no Ray."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import torch

from torch_raydata.collate import DefaultCollate
from torch_raydata.pipeline.run import EpochRun, PipelineConfig
from torch_raydata.pipeline.stats import StatsRecorder
from torch_raydata.transports import LocalTransport

from .fakes import make_blocks, source_of


def _run(tables, collate=None, **cfg):
    blocks, fetcher = source_of(tables)
    epoch = cfg.pop("epoch", 0)
    config = PipelineConfig(**({"batch_size": 16, "num_workers": 3, "prefetch_batches": 2} | cfg))
    return EpochRun(
        blocks,
        fetcher,
        collate or DefaultCollate(),
        LocalTransport(),
        config,
        epoch=epoch,
        stats=StatsRecorder(epoch),
        record_ids=config.id_column is not None,
    )


def _trd_threads():
    return [t.name for t in threading.enumerate() if t.name.startswith("trd-")]


def test_every_row_once_and_stats_add_up():
    run = _run(make_blocks([37, 50, 13, 100]))
    ids = np.concatenate([b["id"].numpy() for b in run])
    assert sorted(ids.tolist()) == list(range(200))
    s = run.stats.snapshot(0)
    assert s.batches == 13 and s.rows == 200 and s.rows_dropped == 0
    assert s.buffered_batches == 0 and s.buffered_bytes == 0
    # Bound: every buffered batch is counted and stays within the pool + finalize bounds.
    assert 1 <= s.peak_buffered_batches <= 2 * 3 + 2
    assert s.wait_max_ms >= s.wait_p99_ms >= s.wait_p50_ms >= 0
    assert _trd_threads() == []


def test_preserve_order_gives_stream_order():
    run = _run(make_blocks([7] * 30), preserve_order=True, num_workers=4)
    ids = np.concatenate([b["id"].numpy() for b in run])
    assert ids.tolist() == list(range(210))


def test_in_place_modification_does_not_touch_the_source():
    tables = make_blocks([64, 64])
    for b in _run(tables):
        b["x"].mul_(0).add_(-1)  # a training step mutating its batch
        b["id"].zero_()
    again = np.concatenate([b["x"].numpy() for b in _run(tables, preserve_order=True)])
    assert np.array_equal(again, np.arange(128, dtype=np.float32) * 0.5)


def test_collate_error_at_batch_k_reaches_consumer_and_threads_stop():
    class Bad(ValueError):
        pass

    def collate(table):
        if table.column("id")[0].as_py() == 48:  # the 4th batch (k=3)
            raise Bad("cannot collate this one")
        return DefaultCollate()(table)

    run = _run(make_blocks([200]), collate=collate, preserve_order=True)
    got = []
    with pytest.raises(Bad, match="cannot collate this one") as ei:
        for b in run:
            got.append(b)
    notes = "\n".join(ei.value.__notes__)
    assert "stage 4 (collate)" in notes and "batch 3" in notes
    assert len(got) == 3  # nothing after the failing batch was delivered as if whole
    assert _trd_threads() == []


def test_collate_returning_none_is_a_type_error():
    run = _run(make_blocks([20]), collate=lambda t: None)
    with pytest.raises(TypeError, match="returned None for batch"):
        list(run)


def test_break_and_gc_stop_every_thread():
    run = _run(make_blocks([16] * 1000))
    next(run)
    del run
    gc.collect()
    assert _trd_threads() == []
    run = _run(make_blocks([16] * 1000))
    for i, _ in enumerate(run):
        if i == 2:
            break
    run.close()
    assert _trd_threads() == []
    assert run.stats.snapshot(0).buffered_batches == 0


def test_ids_recorded_are_exactly_the_rows_yielded():
    run = _run(make_blocks([30, 30]), id_column="id", batch_size=8)
    seen = []
    for i, b in enumerate(run):
        seen.append(b["id"].numpy().copy())
        if i == 3:
            break
    consumed = run.consumed_ids()
    run.close()
    assert sorted(consumed.tolist()) == sorted(np.concatenate(seen).tolist())
    assert len(consumed) == 32  # yielded, not prefetched or collated-and-waiting


def test_shuffle_epochs_differ_and_repeat_with_the_seed():
    def order(epoch):
        run = _run(
            make_blocks([50] * 6),
            shuffle_buffer_size=100,
            shuffle_seed=7,
            epoch=epoch,
            preserve_order=True,
        )
        return np.concatenate([b["id"].numpy() for b in run]).tolist()

    assert order(0) == order(0)
    assert order(0) != order(1)
    assert sorted(order(1)) == list(range(300))


def test_batches_are_dicts_of_tensors():
    (b, *_) = list(_run(make_blocks([16])))
    assert set(b) == {"id", "x"}
    assert b["id"].dtype == torch.int64 and b["x"].dtype == torch.float32


@pytest.mark.timeout(60)
def test_skipping_and_capping_more_batches_than_the_bound_do_not_stall():
    """The consumer frees a batch's slot at the end of next() (deferred release): the
    skip-ahead and max_batches paths pull many batches in one call and must free each
    slot as they go, or a pool bounded at 2 would stall after two."""
    tables = make_blocks([25] * 8)  # 200 rows, 20 batches of 10
    blocks, fetcher = source_of(tables)
    cfg = PipelineConfig(batch_size=10, num_workers=1, prefetch_batches=1)
    run = EpochRun(blocks, fetcher, DefaultCollate(), LocalTransport(), cfg, skip_batches=12)
    assert sum(len(b["id"]) for b in run) == 80
    blocks, fetcher = source_of(tables)
    run = EpochRun(blocks, fetcher, DefaultCollate(), LocalTransport(), cfg, max_batches=3)
    assert sum(len(b["id"]) for b in run) == 30
    assert run.stats.rows_dropped == 170


def test_the_consumer_takes_any_chain_of_stages():
    """EpochConsumer is the training step's side of every epoch (local and remote): over a
    plain iterator it skips, caps, counts, records IDs and closes its stages once."""
    from torch_raydata.pipeline.consumer import EpochConsumer
    from torch_raydata.pipeline.types import Batch

    class Chain(EpochConsumer):
        def __init__(self, n, **kw):
            super().__init__(**kw)
            self.shutdowns = 0
            self._batches = iter(
                [Batch(i, f"b{i}", 10, 100, ids=np.arange(10 * i, 10 * i + 10)) for i in range(n)]
            )

        def _shutdown(self):
            self.shutdowns += 1

    run = Chain(6, skip_batches=1, max_batches=4, record_ids=True)
    assert list(run) == ["b1", "b2", "b3"]  # one skipped, capped at 4 pulled, 2 dropped
    assert run.closed and run.shutdowns == 1 and run.progress.exhausted
    assert run.batches_yielded == 3 and run.rows_yielded == 30
    assert run.consumed_ids().tolist() == list(range(10, 40))
    assert run.stats.rows_dropped == 20 and run.stats.snapshot(0).batches == 3
    run.close()
    assert run.shutdowns == 1
    short = Chain(2, max_batches=3)
    with pytest.raises(RuntimeError, match=r"ended after 2 batches .* max_batches=3"):
        list(short)
    assert short.shutdowns == 1 and not short.progress.exhausted


def test_stats_count_collate_threads_and_the_loaders_cpu():
    fixed = _run(make_blocks([64] * 4), num_workers=3)
    assert sum(len(b["id"]) for b in fixed) == 256
    s = fixed.stats.snapshot(0)
    assert s.collate_threads == 3
    assert s.loader_cpu_ms_per_batch > 0  # prefetch + 3 collate threads reported at exit
    assert "3 collate threads" in str(s) and "ms/batch" in str(s)
    grown = _run(make_blocks([64] * 4), num_workers=3, grow_workers=True)
    first = next(grown)
    assert 1 <= grown.stats.snapshot(0).collate_threads <= 3
    assert sum(len(b["id"]) for b in grown) + len(first["id"]) == 256
    assert 1 <= grown.stats.snapshot(0).collate_threads <= 3
    assert _trd_threads() == []
