"""The loader state: what goes into a checkpoint, what a loaded one asks of the next epoch.

Owns the state's format (``STATE_VERSION``), taking it from the running epoch's tally
(``ResumeState.state_dict``), checking and loading one (``ResumeState.load``: the
fingerprint of the dataset and configuration must match) and planning the resumed
epoch (``ResumeState.plan``: a filter on the cluster, or keys to drop in stage 3).
Does not own the epochs themselves (``RayIterableDataset``), the consumed-ID set
(``consumed.py``) nor merging ranks' states (``merge.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from typing import Any

from .consumed import ConsumedSet, check_parts
from .filter import ConsumedFilter, SharedConsumedSet

__all__ = ["STATE_VERSION", "ResumePlan", "ResumeState", "fingerprint"]

STATE_VERSION = 2


@dataclass(frozen=True)
class ResumePlan:
    """How one epoch's stream leaves out the rows a loaded state consumed.

    Attributes:
        transform: ``Dataset -> Dataset`` appending the cluster-side filter, or None.
        drop_keys: consumed keys for stage 3 to drop (a ``ConsumedSet``), or None.
        total_rows: the epoch's remaining rows over the whole input, when known.
    """

    transform: Callable[[Any], Any] | None = None
    drop_keys: Any = None
    total_rows: int | None = None


def fingerprint(config: Any, source: Any) -> dict[str, Any]:
    """What a state must agree on with the loader that loads it."""
    return {
        "batch_size": config.batch_size,
        "shuffle_seed": config.shuffle_seed,
        "id_column": config.id_column,
        "columns": source.column_names(),
        "num_rows": source.total_rows(),  # the whole input's, not one rank's
    }


class ResumeState:
    """A loaded state's hold on the epochs to come (one per ``RayIterableDataset``).

    ``epoch`` is the epoch the loaded state is for (None: none loaded, or it is over),
    ``count`` the IDs its set holds (exact mode; the set itself is decoded when first
    needed: under torch.distributed only rank 0 builds the filter, and a set saved in
    per-rank parts is read then), ``rows`` the rows it had consumed, and
    ``skip_batches`` the batches the next epoch skips (best-effort mode).
    """

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.count = 0
        self.rows = 0
        self.skip_batches = 0
        self._encoded: Any = None  # the loaded state's "consumed" entry
        self._set: ConsumedSet | None = None  # decoded from it (lazily)
        self._search_dir: str | None = None

    @property
    def consumed(self) -> ConsumedSet | None:
        """The loaded set (decoded on first use), or None."""
        if self._set is None and self._encoded is not None:
            self._set = ConsumedSet.decode(self._encoded, search_dir=self._search_dir)
        return self._set

    def _forget(self) -> None:
        self.epoch, self.count, self.rows = None, 0, 0
        self._encoded, self._set = None, None

    def begin(self, epoch: int) -> int:
        """``epoch`` starts: forget a loaded state for another epoch; return the batches to
        skip (taken once)."""
        skip, self.skip_batches = self.skip_batches, 0
        if self.epoch is not None and epoch != self.epoch:
            self._forget()
        return skip

    def attach(self, progress: Any, *, rank: int) -> None:
        """The resumed epoch's record (an ``EpochProgress``) starts from the loaded set, so
        its states hold both; folded on the set's own thread. Under torch.distributed on
        rank 0 only: the ranks' states are united, and the loaded set must count once."""
        consumed = getattr(progress, "consumed", None)
        if consumed is None or self.epoch is None or progress.epoch != self.epoch:
            return
        if rank == 0 and self.count:
            consumed.include(self.consumed)

    def plan(self, epoch: int, source: Any, id_column: str | None, world_size: int) -> ResumePlan:
        """For a resumed epoch: the filter appended to the dataset (run on the cluster,
        fused into its last map task; the ID set goes into the object store once, by the
        one process that builds the epoch's dataset: rank 0 under torch.distributed), or
        the keys to drop in stage 3 — for a DataIterator input, which cannot take stages,
        and for a single-process materialized dataset, where an appended stage would be a
        task of its own re-writing every block (measured: benchmarks/bench_resume.py); and
        the epoch's remaining row count (whole input)."""
        if self._encoded is None or epoch != self.epoch:
            return ResumePlan()
        # The set is the whole epoch's (merged over ranks): count against the whole input.
        n = source.total_rows()
        total_rows = max(0, n - self.count) if n is not None else None
        if self.count == 0:  # nothing consumed yet: an ordinary epoch
            return ResumePlan(total_rows=total_rows)
        if source.is_shard or (not source.ends_in_map() and world_size == 1):
            # Under torch.distributed the remaining rows must be split afresh (each rank's
            # equal share of what is left): a filter on the dataset, then a split of its
            # own. A local drop after the first split would leave the ranks unequal.
            return ResumePlan(drop_keys=self.consumed, total_rows=total_rows)

        def transform(ds: Any) -> Any:
            udf = ConsumedFilter(SharedConsumedSet.put(self.consumed), id_column)
            return ds.map_batches(
                udf, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
            )

        return ResumePlan(transform=transform, total_rows=total_rows)

    def state_dict(
        self,
        tally: Any,
        *,
        next_epoch: int,
        consumer_lag: int,
        id_column: str | None,
        batch_size: int,
        fingerprint: dict[str, Any],
        world_size: int,
        spill_dir: str | None,
        rank: int = 0,
    ) -> dict[str, Any]:
        """The state to checkpoint, from the running or last epoch's ``tally`` (an
        ``EpochProgress``, or None); see ``RayIterableDataset.state_dict``. Under
        torch.distributed, a loaded state's IDs and rows are in rank 0's state only (the
        ranks' states are united: ``merge_states``)."""
        carries_loaded = rank == 0
        consumed_enc: dict | None = None
        if tally is not None and not tally.finished(consumer_lag):
            epoch = tally.epoch
            batches = tally.batches_skipped + max(0, tally.batches_yielded - consumer_lag)
            rows = tally.rows_consumed(consumer_lag)
            if epoch == self.epoch and carries_loaded:
                rows += self.rows
            consumed = tally.consumed if id_column else None
            if consumed is not None:
                repeats = consumed.known_repeats  # O(1): see ConsumedSet.known_repeats
                if repeats:
                    raise ValueError(
                        f"id_column={id_column!r} is not unique: the {consumed.added} rows "
                        f"yielded this epoch carry {consumed.added - repeats} "
                        "distinct IDs (not counting those of a loaded state), and a resume "
                        "by ID would skip every row sharing an ID with a consumed one. Make "
                        "the column unique (e.g. add a row number in a map_batches step), or "
                        "pass id_column=None for a best-effort resume"
                    )
                consumed_enc = consumed.encode(spill_dir=spill_dir, lag=consumer_lag)
        elif self.epoch is not None and self.epoch == next_epoch:
            # Loaded and not started yet: the loaded state still stands.
            epoch, batches = self.epoch, self.skip_batches
            rows = self.rows if carries_loaded else 0
            if id_column is not None and carries_loaded and self._encoded is not None:
                enc = self._encoded
                # Inline bytes are kept as loaded; a spilled set or parts (files another
                # checkpoint owns) are written afresh for this one.
                consumed_enc = (
                    enc if "bytes" in enc else self.consumed.encode(spill_dir=spill_dir)
                )
        else:  # between epochs: resume at the start of the next one
            epoch, batches, rows = next_epoch, 0, 0
        state: dict[str, Any] = {
            "version": STATE_VERSION,
            "epoch": epoch,
            "batches_consumed": batches,
            "rows_consumed": rows,
            "batch_size": batch_size,
            "exact": id_column is not None,
            "world_size": world_size,
            "fingerprint": fingerprint,
        }
        if id_column is not None:
            state["consumed"] = consumed_enc or ConsumedSet().encode()
        return state

    def load(
        self,
        state: Any,
        *,
        fingerprint: dict[str, Any],
        id_column: str | None,
        strict: bool = True,
        search_dir: str | None = None,
    ) -> int:
        """Check ``state`` against this loader's ``fingerprint`` and hold it for its epoch;
        return that epoch. See ``RayIterableDataset.load_state_dict``. Files of a spilled
        set or its parts whose recorded path is gone are looked for in ``search_dir``."""
        _check_format(state)
        exact = bool(state.get("exact"))
        theirs = state.get("fingerprint") or {"batch_size": state["batch_size"]}
        keys = ["id_column", "columns", "num_rows"]
        if not exact or strict:
            keys += ["batch_size"] + ([] if exact else ["shuffle_seed"])
        for key in keys:
            a, b = theirs.get(key, fingerprint[key]), fingerprint[key]
            if a is not None and b is not None and a != b:
                raise ValueError(
                    f"loader state was saved with {key}={a!r}, this loader has {key}={b!r}: it "
                    "is the state of another dataset or configuration"
                    + (" (pass strict=False to accept it)" if key == "batch_size" else "")
                )
        if exact and id_column is None:
            raise ValueError(
                "loader state is exact (saved with id_column="
                f"{theirs.get('id_column')!r}); create this loader with the same id_column"
            )
        if not exact and id_column is not None:
            raise ValueError(
                "loader state has no consumed-ID set (saved without id_column); it cannot "
                f"resume a loader with id_column={id_column!r} exactly"
            )
        epoch = int(state["epoch"])
        encoded, loaded, count = None, None, 0
        if exact:
            encoded = state.get("consumed")
            if isinstance(encoded, dict) and encoded.get("format") == "roaring64-parts":
                count = check_parts(encoded, search_dir)  # read when first needed
            else:  # one blob: decoded (and checked) now
                loaded = ConsumedSet.decode(encoded, search_dir=search_dir)
                count = len(loaded)
        self._forget()
        self.epoch = epoch
        self.rows = int(state.get("rows_consumed", 0))
        self._encoded, self._set, self.count = encoded, loaded, count
        self._search_dir = search_dir
        self.skip_batches = 0 if exact else int(state["batches_consumed"])
        return epoch


def _check_format(state: Any) -> None:
    """Raise ValueError unless ``state`` is a loader state of ``STATE_VERSION``."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise ValueError(
            f"not a RayIterableDataset state (version {STATE_VERSION} expected): "
            f"{state!r:.200}"
        )
    missing = {"epoch", "batches_consumed", "batch_size"} - state.keys()
    if missing:
        raise ValueError(f"loader state is missing {sorted(missing)}: {state!r:.200}")
    for key in ("epoch", "batches_consumed", "rows_consumed", "batch_size"):
        value = state.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
            raise ValueError(
                f"loader state has {key}={value!r}, not an int >= 0: it is corrupt or "
                "not a RayIterableDataset state"
            )
