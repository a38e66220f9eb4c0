"""The likelihood scorer's packed layout: a prompt and all its continuations in one row, one pass.

A row holds whole groups, each group one prompt then the fed tokens of each of its continuations
(all but the last token). Every token sees the earlier tokens of its own group's prompt and of its
own continuation, and nothing else (`attend`); a continuation's tokens take the positions that
follow its prompt, so each token's hidden state is the one a plain forward of `prompt +
continuation` gives it. Several groups share a row, so rows are 93-95 % real tokens (the cached
layout pads every prompt to a length bucket and every continuation to another). One jitted pass
per `rows_per_call` rows of one length: the prompt is read once, every continuation token once,
and logits are computed only where a continuation token is predicted (the prompt's last position
and each fed token), at most `length // 2` positions a row.

It computes every continuation exactly: nothing is pruned, and no lead is scored (a beam needs the
cached layout, `likelihood.continuation_logprobs(layout="cached")`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft.models import Decoder
from jaxsft.models.sharding import batch_sharding, global_array, host_array

ROW_LENGTHS = (64, 128, 256, 512)  # packed row lengths, in tokens; a row of length L scores <= L // 2 positions

Pair = tuple[tuple[int, ...], tuple[int, ...]]


@dataclasses.dataclass(eq=False)  # rows are told apart by identity
class Row:
    """One packed row: per token its id, position, group (1, 2, ...; 0: padding) and branch (0: the
    group's prompt, k: its k-th continuation); the slots whose logits are needed; and the queries
    (scored slot index, target token, pair)."""

    length: int
    ids: list[int] = dataclasses.field(default_factory=list)
    positions: list[int] = dataclasses.field(default_factory=list)
    group: list[int] = dataclasses.field(default_factory=list)
    branch: list[int] = dataclasses.field(default_factory=list)
    scored: list[int] = dataclasses.field(default_factory=list)
    queries: list[tuple[int, int, int]] = dataclasses.field(default_factory=list)

    def fits(self, tokens: int, scored: int, queries: int) -> bool:
        return (len(self.ids) + tokens <= self.length and len(self.scored) + scored <= self.length // 2
                and len(self.queries) + queries <= self.length)

    def add(self, prompt: tuple[int, ...], conts: Sequence[tuple[int, tuple[int, ...]]]) -> None:
        """Append a group: the prompt, then each (pair, continuation)'s tokens but the last."""
        g = max(self.group, default=0) + 1
        self.ids += prompt
        self.positions += range(len(prompt))
        self.group += [g] * len(prompt)
        self.branch += [0] * len(prompt)
        last = len(self.scored)
        self.scored.append(len(self.ids) - 1)
        for b, (pair, cont) in enumerate(conts, start=1):
            self.queries.append((last, cont[0], pair))
            for k, token in enumerate(cont[:-1]):
                self.ids.append(token)
                self.positions.append(len(prompt) + k)
                self.group.append(g)
                self.branch.append(b)
                self.scored.append(len(self.ids) - 1)
                self.queries.append((len(self.scored) - 1, cont[k + 1], pair))


def pack(pairs: Sequence[Pair], row_lengths: Sequence[int] = ROW_LENGTHS) -> list[Row]:
    """The groups of `pairs` (one per distinct prompt) packed into rows of the shortest length each
    fits, largest first, each into the row with the fewest free tokens that takes it (best-fit
    decreasing; rows are indexed by their free tokens)."""
    groups: dict[tuple[int, ...], list[tuple[int, tuple[int, ...]]]] = {}
    for i, (prompt, cont) in enumerate(pairs):
        groups.setdefault(tuple(prompt), []).append((i, tuple(cont)))
    sized = []
    for prompt, conts in groups.items():
        fed = sum(len(c) - 1 for _, c in conts)
        need = (len(prompt) + fed, 1 + fed, sum(len(c) for _, c in conts))
        length = next((n for n in row_lengths if Row(n).fits(*need)), None)
        if length is None:
            raise ValueError(f"a prompt of {len(prompt)} tokens with {len(conts)} continuations fits no packed "
                             f"row of {max(row_lengths)} tokens")
        sized.append((length, need, prompt, conts))
    rows: list[Row] = []
    free: dict[int, dict[int, list[Row]]] = {}  # per length, rows by their free tokens: best fit in linear time
    for length, need, prompt, conts in sorted(sized, key=lambda s: (s[0], s[1][0]), reverse=True):
        by_room = free.setdefault(length, {})
        row = next((r for room in range(need[0], length + 1) for r in by_room.get(room, ()) if r.fits(*need)), None)
        if row is None:
            rows.append(row := Row(length))
        else:
            by_room[row.length - len(row.ids)].remove(row)
        row.add(prompt, conts)
        by_room.setdefault(row.length - len(row.ids), []).append(row)
    return rows


def packed_pass(model: Decoder, ids: jax.Array, positions: jax.Array, group: jax.Array, branch: jax.Array,
                scored: jax.Array, query_slot: jax.Array, query_token: jax.Array, temperature: jax.Array) -> jax.Array:
    """log P_T of each query's token [R, Q] at its scored slot, for packed rows [R, L]."""
    length = ids.shape[1]
    same_group = (group[:, :, None] == group[:, None, :]) & (group[:, None, :] > 0)
    own_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    causal = jnp.tril(jnp.ones((length, length), bool))
    attend = (same_group & own_branch & causal) | (jnp.eye(length, dtype=bool) & (group[:, :, None] == 0))
    hidden, _ = model.hidden_states(ids, positions=positions, attend=attend)
    at = jnp.take_along_axis(hidden, scored[..., None], axis=1)  # [R, K, E]
    logits = model.unembed(at.astype(jnp.float32)).astype(jnp.float32) / temperature  # [R, K, V]
    vocab = logits.shape[-1]
    picked = jnp.take_along_axis(logits.reshape(len(ids), -1), query_slot * vocab + query_token, axis=1)
    return picked - jnp.take_along_axis(jax.nn.logsumexp(logits, axis=-1), query_slot, axis=1)


_packed_pass = nnx.jit(packed_pass)


def logprobs(model: Decoder, pairs: Sequence[Pair], *, temperature: float, rows_per_call: int,
             row_lengths: Sequence[int] = ROW_LENGTHS, mesh: jax.sharding.Mesh | None = None,
             progress: Callable[[int], None] | None = None, stats: dict | None = None) -> np.ndarray:
    """log P_T(continuation | prompt) for each (prompt ids, continuation ids) pair, float64 [n]:
    `rows_per_call` packed rows a pass (a multiple of the mesh's data shards). `progress(n)` is told
    the pairs each pass finished; `stats`, when given, receives the counts of rows, passes and tokens."""
    place = (lambda x: global_array(x, batch_sharding(mesh, x.ndim))) if mesh is not None else jnp.asarray
    temperature = jnp.float32(temperature)
    out = np.zeros(len(pairs), np.float64)
    counts = dict(pairs=len(pairs), packed_rows=0, packed_calls=0, packed_tokens=0, real_tokens=0)
    rows = pack(pairs, row_lengths)
    for length in sorted({r.length for r in rows}):
        same = [r for r in rows if r.length == length]
        for start in range(0, len(same), rows_per_call):
            chunk = same[start:start + rows_per_call]
            arrays = {k: np.zeros((rows_per_call, n), np.int32) for k, n in
                      (("ids", length), ("positions", length), ("group", length), ("branch", length),
                       ("scored", length // 2), ("query_slot", length), ("query_token", length))}
            for r, row in enumerate(chunk):
                for key in ("ids", "positions", "group", "branch", "scored"):
                    arrays[key][r, :len(getattr(row, key))] = getattr(row, key)
                arrays["query_slot"][r, :len(row.queries)] = [q[0] for q in row.queries]
                arrays["query_token"][r, :len(row.queries)] = [q[1] for q in row.queries]
            logp = host_array(_packed_pass(model, *(place(arrays[k]) for k in (
                "ids", "positions", "group", "branch", "scored", "query_slot", "query_token")), temperature))
            done = set()
            for r, row in enumerate(chunk):
                for q, (_, _, pair) in enumerate(row.queries):
                    out[pair] += logp[r, q]
                    done.add(pair)
                counts["real_tokens"] += len(row.ids)
            counts["packed_rows"] += rows_per_call
            counts["packed_calls"] += 1
            counts["packed_tokens"] += rows_per_call * length
            if progress is not None:
                progress(len(done))
    if stats is not None:
        stats.update(counts)
    return out
