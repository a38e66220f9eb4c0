"""Length buckets and padding: variable lengths map to a few shapes, so a run compiles a bounded
number of times (once per bucket and batch shape)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


def bucket_length(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length`; past the largest, the next multiple of it."""
    for b in sorted(buckets):
        if length <= b:
            return b
    top = max(buckets)
    return -(-length // top) * top


def bucketed_batches(lengths: Sequence[int], buckets: Sequence[int], batch_size: int
                     ) -> Iterator[tuple[int, list[int]]]:
    """(bucket, indices) batches of at most `batch_size` items, items grouped by bucket and kept in
    their original order inside each bucket."""
    by_bucket: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_bucket.setdefault(bucket_length(n, buckets), []).append(i)
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        for start in range(0, len(items), batch_size):
            yield bucket, items[start:start + batch_size]


def pad(rows: Sequence[Sequence[int]], length: int, batch_size: int | None = None, *, left: bool,
        pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Pad rows to [batch_size, length] (extra rows are all padding): ids and a 0/1 mask."""
    n = batch_size or len(rows)
    ids = np.full((n, length), pad_id, np.int32)
    mask = np.zeros((n, length), np.int32)
    for r, row in enumerate(rows):
        if len(row) > length:
            raise ValueError(f"row {r} has {len(row)} tokens, more than the padded length {length}")
        span = slice(length - len(row), length) if left else slice(0, len(row))
        ids[r, span], mask[r, span] = row, 1
    return ids, mask
