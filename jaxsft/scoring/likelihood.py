"""The likelihood scorer: per-template hit probabilities from teacher-forced log-probabilities.

What it estimates. The paper samples completions of each template at temperature T and counts
those whose normalised text contains the object or an alias. Here, for template j,

    p_j = min(1, sum_c P_T(the completion starts with c))

over the continuations c of the object and its aliases: `" " + alias`, and the same alias after
each lead in `LEADS` (`" the United States"`), since normalisation drops a leading article and
sampling counts "the United States" as a hit. P_T is the product of softmax(logits / T) over the
continuation's tokens, prompt and continuation tokenised together. A continuation whose tokens
extend another one's (`" United States of America"` after `" United States"`) is left out: its
event is inside the shorter one's, and what remains are disjoint events, so the sum is the
probability of their union. What p_j does not count: answers later in the output ("in 1950 in
Paris") and spellings that are not an alias; what it counts that sampling does not: a completion
where the alias is the start of a longer word. Levels come from the p_j as the level the sampling
protocol most likely gives (`levels.expected_level`), so that level 0 exists.

How it runs. Two jitted passes per batch of prompts. The prompt pass prefills `batch_size`
distinct prompts, right-padded to a length bucket, and unembeds each prompt's last position once:
that gives every continuation's first-token log-probability (single-token continuations are then
done). The prompts' KV cache stays on the device; the continuation pass gathers it for each
remaining continuation (grouped by continuation length bucket, `items_per_call` rows a call) and
scores tokens 2..n, unembedding only those positions. A run compiles the prompt pass once per
prompt bucket and the continuation pass once per (prompt bucket, continuation bucket) used.

Certified pruning (`prune_epsilon` = e > 0). A continuation's probability is at most its first
token's: P_T(c) <= P_T(c_1). The kept continuations of a template are disjoint events, so those
starting with the same token t together have probability at most P_T(t). For each prompt, the
groups of multi-token continuations are sorted by U_t = P_T(t) (known after the prompt pass) and
the smallest are skipped while the sum of their U_t stays <= e; skipped continuations count 0
(log-probability -inf). Hence, for every template, the computed p_j and the exact one satisfy
p_j(pruned) <= p_j(exact) <= p_j(pruned) + e (the clip at 1 only narrows the gap).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft import batching, tokenization
from jaxsft.data import answers as answers_lib
from jaxsft.data import templates as templates_lib
from jaxsft.models import Decoder, KVCache
from jaxsft.models.sharding import batch_sharding, global_array, host_array

LEADS = ("", "the ")  # what may precede an alias in a completion and still count after normalisation
_ARTICLES = ("a ", "an ", "the ")
CONTINUATION_BUCKETS = (2, 4, 8, 16)  # padded continuation lengths, in tokens
FIRST_TOKENS = 32  # continuations per prompt row in the prompt pass; a prompt with more takes more rows
ITEMS_PER_PROMPT = 2  # continuation rows per prompt row of `_continuation_logprobs` (AOT estimates)

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, continuation ids)


def _log_softmax_at(model: Decoder, hidden: jax.Array, targets: jax.Array, temperature: jax.Array) -> jax.Array:
    """log softmax(logits / T)[target], in float32, for hidden states [..., E] and targets [..., K]."""
    logits = model.unembed(hidden.astype(jnp.float32)).astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(logits, targets, axis=-1)
    return picked - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def prompt_pass(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array, first_ids: jax.Array,
                temperature: jax.Array) -> tuple[KVCache, jax.Array]:
    """Prefill right-padded prompts [P, Lp]; log P_T of the tokens first_ids [P, K] after each prompt.

    Returns the prompts' KV cache (Lp slots) and float32 [P, K].
    """
    n_prompts, prompt_len = prompt_ids.shape
    hidden, cache = model.hidden_states(prompt_ids, prompt_mask, cache=model.init_cache(n_prompts, prompt_len))
    last = jnp.take_along_axis(hidden, (prompt_mask.sum(-1) - 1)[:, None, None], axis=1)[:, 0]  # [P, E]
    return cache, _log_softmax_at(model, last, first_ids, temperature)


def continuation_pass(model: Decoder, cache: KVCache, item_prompt: jax.Array, item_ids: jax.Array,
                      item_mask: jax.Array, temperature: jax.Array) -> jax.Array:
    """Sum of log P_T of tokens 2..n of each continuation item_ids [I, Lc] (right-padded, Lc >= 2)
    after its prompt's cache row `item_prompt`: tokens 1..n-1 are fed, float32 [I]."""
    pad = item_ids.shape[1] - 1

    def rows(c: jax.Array) -> jax.Array:  # [L, P, Lp, ...] -> [L, I, Lp + pad, ...]
        return jnp.pad(c[:, item_prompt], ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (c.ndim - 3))

    items_cache = KVCache(rows(cache.k), rows(cache.v), jnp.pad(cache.valid[item_prompt], ((0, 0), (0, pad))),
                          cache.index)
    inputs_mask = item_mask[:, 1:]
    hidden, _ = model.hidden_states(item_ids[:, :-1], inputs_mask, cache=items_cache)
    token_logp = _log_softmax_at(model, hidden, item_ids[:, 1:, None], temperature)[..., 0]
    return jnp.where(inputs_mask.astype(bool), token_logp, 0.0).sum(-1)


_prompt_pass = nnx.jit(prompt_pass)
_continuation_pass = nnx.jit(continuation_pass)


@nnx.jit
def _continuation_logprobs(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array, item_prompt: jax.Array,
                           item_ids: jax.Array, item_mask: jax.Array, temperature: jax.Array) -> jax.Array:
    """Both passes of one batch in one program, log P_T of each whole continuation [I] (item_ids
    [I, Lc], Lc >= 2): what `jaxsft.compile` sizes for the accelerator's memory."""
    cache, first = prompt_pass(model, prompt_ids, prompt_mask, jnp.broadcast_to(item_ids[:, 0], (prompt_ids.shape[0],
                                                                                                  item_ids.shape[0])),
                               temperature)
    first = first[item_prompt, jnp.arange(item_ids.shape[0])]
    return first + continuation_pass(model, cache, item_prompt, item_ids, item_mask, temperature)


@dataclasses.dataclass
class _Batch:
    prompt_bucket: int
    prompts: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    items: list[list[int]] = dataclasses.field(default_factory=list)  # per prompt row: its pair indices


def plan_batches(pairs: Sequence[Pair], batch_size: int, buckets: Sequence[int],
                 first_tokens: int = FIRST_TOKENS) -> list[_Batch]:
    """Prompt rows of up to `first_tokens` of a prompt's pairs, packed `batch_size` rows a batch of
    one prompt bucket, shortest prompts first."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(prompt, []).append(i)
    rows = sorted(((batching.bucket_length(len(prompt), buckets), prompt, idx[start:start + first_tokens])
                   for prompt, idx in by_prompt.items() for start in range(0, len(idx), first_tokens)),
                  key=lambda r: (r[0], len(r[1])))
    batches = []
    for bucket, group in itertools.groupby(rows, key=lambda r: r[0]):
        group = list(group)
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            batches.append(_Batch(bucket, [r[1] for r in chunk], [r[2] for r in chunk]))
    return batches


def prune(first_logp: Mapping[int, float], pairs: Sequence[Pair], candidates: Sequence[int], budget: float
          ) -> tuple[set[int], float]:
    """The candidates (multi-token pairs of one prompt) to skip, and the budget left: whole groups of
    one first token, smallest bound P_T(first token) first, while the bounds' sum stays in `budget`."""
    groups: dict[int, list[int]] = {}
    for i in candidates:
        groups.setdefault(pairs[i][1][0], []).append(i)
    skipped: set[int] = set()
    for token in sorted(groups, key=lambda t: first_logp[groups[t][0]]):
        bound = float(np.exp(first_logp[groups[token][0]]))
        if bound > budget:
            break
        budget -= bound
        skipped.update(groups[token])
    return skipped, budget


def continuation_logprobs(model: Decoder, pairs: Sequence[Pair], *, temperature: float, batch_size: int,
                          buckets: Sequence[int], continuation_buckets: Sequence[int] = CONTINUATION_BUCKETS,
                          items_per_call: int | None = None, prune_epsilon: float = 0.0,
                          mesh: jax.sharding.Mesh | None = None, pad_id: int = 0,
                          progress: Callable[[int], None] | None = None, stats: dict | None = None) -> np.ndarray:
    """log P_T(continuation | prompt) for each (prompt ids, continuation ids) pair, float64 [n].

    With `prune_epsilon` > 0, pairs that cannot move their prompt's summed probability by more
    (module docstring) are skipped and get -inf. `items_per_call` continuation rows run per
    continuation pass (default: a quarter of `batch_size`, a multiple of the mesh's data shards:
    small calls waste few padding rows per length bucket).
    `progress(n)` is called after each batch with the number of pairs it finished; `stats`, when
    given, receives the counts of the work done and skipped.
    """
    if any(not prompt or not cont for prompt, cont in pairs):
        raise ValueError("every pair needs at least one prompt token and one continuation token")
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {shards} data shards of the mesh")
    items_per_call = items_per_call or -(-max(batch_size // 4, 1) // shards) * shards
    place = (lambda x: global_array(x, batch_sharding(mesh, x.ndim))) if mesh is not None else jnp.asarray
    temperature = jnp.float32(temperature)
    counts = dict(pairs=len(pairs), prompt_rows=0, prompt_batches=0, first_token_only=0, pruned=0,
                  continuation_pairs=0, continuation_rows=0, continuation_calls=0)
    out = np.zeros(len(pairs), np.float64)
    budget: dict[tuple[int, ...], float] = {}
    for batch in plan_batches(pairs, batch_size, buckets):
        prompt_ids, prompt_mask = batching.pad(batch.prompts, batch.prompt_bucket, batch_size, left=False,
                                               pad_id=pad_id)
        prompt_mask[len(batch.prompts):, 0] = 1  # filler rows attend to one token
        first_ids = np.zeros((batch_size, FIRST_TOKENS), np.int32)
        for row, idx in enumerate(batch.items):
            first_ids[row, :len(idx)] = [pairs[i][1][0] for i in idx]
        cache, first = _prompt_pass(model, place(prompt_ids), place(prompt_mask), place(first_ids), temperature)
        first = host_array(first)
        first_logp = {i: float(first[row, k]) for row, idx in enumerate(batch.items) for k, i in enumerate(idx)}
        out[list(first_logp)] = list(first_logp.values())
        rest: list[tuple[int, int]] = []  # (prompt row, pair) of the continuation pass
        for row, (prompt, idx) in enumerate(zip(batch.prompts, batch.items)):
            multi = [i for i in idx if len(pairs[i][1]) > 1]
            skipped: set[int] = set()
            if prune_epsilon > 0:
                skipped, budget[prompt] = prune(first_logp, pairs, multi, budget.get(prompt, prune_epsilon))
                out[list(skipped)] = -np.inf
            rest += [(row, i) for i in multi if i not in skipped]
            counts["first_token_only"] += len(idx) - len(multi)
            counts["pruned"] += len(skipped)
        rest.sort(key=lambda r: len(pairs[r[1]][1]))
        for bucket, group in itertools.groupby(rest, key=lambda r: batching.bucket_length(len(pairs[r[1]][1]),
                                                                                         continuation_buckets)):
            group = list(group)
            for start in range(0, len(group), items_per_call):
                rows, idx = zip(*group[start:start + items_per_call])
                item_ids, item_mask = batching.pad([pairs[i][1] for i in idx], bucket, items_per_call, left=False,
                                                   pad_id=pad_id)
                item_prompt = np.zeros(items_per_call, np.int32)
                item_prompt[:len(rows)] = rows
                logp = _continuation_pass(model, cache, place(item_prompt), place(item_ids), place(item_mask),
                                          temperature)
                out[list(idx)] += host_array(logp)[:len(idx)]
                counts["continuation_calls"] += 1
                counts["continuation_rows"] += items_per_call
        counts["continuation_pairs"] += len(rest)
        counts["prompt_rows"] += batch_size
        counts["prompt_batches"] += 1
        if progress is not None:
            progress(sum(map(len, batch.items)))
    if stats is not None:
        stats.update(counts)
    return out


def continuations(answers: Sequence[str], leads: Sequence[str] = LEADS) -> list[str]:
    """The continuations that count as the answer: `" " + name` for every alias, and each alias
    without its own leading article after every lead (`" the United States"`)."""
    out = []
    for name in answers_lib.expand(answers):
        bare = next((name[len(a):] for a in _ARTICLES if name.lower().startswith(a) and len(name) > len(a)), name)
        out += [" " + name] + [" " + lead + bare for lead in leads]
    return list(dict.fromkeys(out))


def disjoint(pairs: Sequence[Pair]) -> list[int]:
    """Indices of the pairs whose token sequence does not extend another's (nor repeat it)."""
    kept: list[int] = []
    for i in sorted(range(len(pairs)), key=lambda i: len(pairs[i][1])):
        prompt, cont = pairs[i]
        if not any(pairs[k][0] == prompt and cont[:len(pairs[k][1])] == pairs[k][1] for k in kept):
            kept.append(i)
    return sorted(kept)


def fact_pairs(tokenizer, facts: Sequence[Mapping], templates: Mapping[str, Sequence[str]],
               leads: Sequence[str] = LEADS) -> tuple[list[tuple[int, int]], list[Pair]]:
    """The (fact, template) cell and the token pair of every continuation that is scored."""
    cells, texts = [], []
    for f, fact in enumerate(facts):
        conts = continuations(fact["answers"], leads)
        for j, template in enumerate(templates[fact["relation"]]):
            prompt = templates_lib.fill(template, fact["subject"])
            cells += [(f, j)] * len(conts)
            texts += [(prompt, c) for c in conts]
    encoded = tokenization.encode_continuations(tokenizer, texts)
    pairs = [(tuple(e.ids[:e.start]), tuple(e.ids[e.start:])) for e in encoded]
    keep = []
    for _, group in itertools.groupby(range(len(pairs)), key=lambda i: cells[i]):
        group = list(group)
        keep += [group[k] for k in disjoint([pairs[i] for i in group])]
    return [cells[i] for i in keep], [pairs[i] for i in keep]


def template_probabilities(model: Decoder, tokenizer, facts: Sequence[Mapping], *,
                           templates: Mapping[str, Sequence[str]] | None = None, leads: Sequence[str] = LEADS,
                           progress: Callable[[float], None] | None = None, **options) -> np.ndarray:
    """p_j for every fact (`subject`, `relation`, `answers`) and template: float64 [facts, templates].

    `options` go to `continuation_logprobs` (temperature, batch_size, buckets, prune_epsilon, mesh,
    stats, ...); `progress(n)` is told the facts done (a fraction: batches mix facts).
    """
    templates = templates if templates is not None else templates_lib.completion_templates()
    probs = np.zeros((len(facts), max(len(t) for t in templates.values())))
    if not facts:
        return probs
    cells, pairs = fact_pairs(tokenizer, facts, templates, leads)
    per_fact = len(facts) / len(pairs)
    logp = continuation_logprobs(model, pairs, **options, progress=progress and (lambda n: progress(n * per_fact)))
    np.add.at(probs, tuple(np.array(cells).T), np.exp(logp))
    return np.minimum(probs, 1.0)
