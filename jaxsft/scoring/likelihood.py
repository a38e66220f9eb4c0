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

How it runs. Continuations that share a prompt share one prefill: a batch holds `batch_size`
prompts, right-padded to a length bucket, and up to `items_per_prompt * batch_size` continuations,
right-padded to a continuation bucket. The prompts' KV cache is gathered per continuation and the
continuations run on it. Only the scored positions are unembedded: each prompt's last position
(the first continuation token of all its continuations) and the continuation positions. A batch's
shape is fixed by its (prompt bucket, continuation bucket), so a run compiles once per pair used.
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
ITEMS_PER_PROMPT = 2  # continuation rows per prompt row in a batch

Pair = tuple[tuple[int, ...], tuple[int, ...]]  # (prompt ids, continuation ids)


def _log_softmax_at(model: Decoder, hidden: jax.Array, targets: jax.Array, temperature: jax.Array) -> jax.Array:
    """log softmax(logits / T)[target], in float32, for hidden states [..., E] and targets [...]."""
    logits = model.unembed(hidden.astype(jnp.float32)).astype(jnp.float32) / temperature
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


@nnx.jit
def _continuation_logprobs(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array, item_prompt: jax.Array,
                           item_ids: jax.Array, item_mask: jax.Array, temperature: jax.Array) -> jax.Array:
    """Sum of log P_T over each item's continuation tokens, given its prompt row `item_prompt`.

    prompt_ids/mask [P, Lp] and item_ids/mask [I, Lc] are right-padded; returns [I] float32.
    """
    n_prompts, prompt_len = prompt_ids.shape
    cont_len = item_ids.shape[1]
    cache = model.init_cache(n_prompts, prompt_len + cont_len - 1)
    hidden, cache = model.hidden_states(prompt_ids, prompt_mask, cache=cache)
    last = jnp.take_along_axis(hidden, (prompt_mask.sum(-1) - 1)[:, None, None], axis=1)  # [P, 1, E]
    logp = _log_softmax_at(model, last[item_prompt, 0], item_ids[:, 0], temperature)
    if cont_len > 1:  # feed tokens 0..n-2 of each continuation to score tokens 1..n-1
        cache = KVCache(cache.k[:, item_prompt], cache.v[:, item_prompt], cache.valid[item_prompt], cache.index)
        inputs_mask = item_mask[:, 1:]
        hidden, _ = model.hidden_states(item_ids[:, :-1], inputs_mask, cache=cache)
        token_logp = _log_softmax_at(model, hidden, item_ids[:, 1:], temperature)
        logp = logp + jnp.where(inputs_mask.astype(bool), token_logp, 0.0).sum(-1)
    return logp


@dataclasses.dataclass
class _Batch:
    prompt_bucket: int
    cont_bucket: int
    prompts: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    items: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # (row in prompts, pair index)


def plan_batches(pairs: Sequence[Pair], batch_size: int, items_per_batch: int, buckets: Sequence[int],
                 continuation_buckets: Sequence[int]) -> list[_Batch]:
    """Group pairs by prompt and pack prompts of one (prompt bucket, continuation bucket) per batch."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(pairs):
        by_prompt.setdefault(prompt, []).append(i)
    units = []
    for prompt, idx in by_prompt.items():
        for start in range(0, len(idx), items_per_batch):
            chunk = idx[start:start + items_per_batch]
            longest = max(len(pairs[i][1]) for i in chunk)
            key = (batching.bucket_length(len(prompt), buckets),
                   batching.bucket_length(longest, continuation_buckets))
            units.append((key, prompt, chunk))
    units.sort(key=lambda u: (u[0], len(u[1])))
    batches = []
    for key, group in itertools.groupby(units, key=lambda u: u[0]):
        batch = None
        for _, prompt, chunk in group:
            if batch is None or len(batch.prompts) == batch_size or len(batch.items) + len(chunk) > items_per_batch:
                batch = _Batch(*key)
                batches.append(batch)
            batch.items.extend((len(batch.prompts), i) for i in chunk)
            batch.prompts.append(prompt)
    return batches


def continuation_logprobs(model: Decoder, pairs: Sequence[Pair], *, temperature: float, batch_size: int,
                          buckets: Sequence[int], continuation_buckets: Sequence[int] = CONTINUATION_BUCKETS,
                          items_per_prompt: int = ITEMS_PER_PROMPT, mesh: jax.sharding.Mesh | None = None,
                          pad_id: int = 0, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """log P_T(continuation | prompt) for each (prompt ids, continuation ids) pair, float64 [n].

    `progress(n)` is called after each batch with the number of pairs it scored.
    """
    if any(not prompt or not cont for prompt, cont in pairs):
        raise ValueError("every pair needs at least one prompt token and one continuation token")
    items_per_batch = items_per_prompt * batch_size
    if mesh is not None:
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % shards:
            raise ValueError(f"batch_size {batch_size} is not a multiple of the {shards} data shards of the mesh")
    place = (lambda x: global_array(x, batch_sharding(mesh, x.ndim))) if mesh is not None else jnp.asarray
    out = np.zeros(len(pairs), np.float64)
    for batch in plan_batches(pairs, batch_size, items_per_batch, buckets, continuation_buckets):
        prompt_ids, prompt_mask = batching.pad(batch.prompts, batch.prompt_bucket, batch_size, left=False,
                                               pad_id=pad_id)
        prompt_mask[len(batch.prompts):, 0] = 1  # filler rows attend to one token
        rows, idx = zip(*batch.items)
        item_ids, item_mask = batching.pad([pairs[i][1] for i in idx], batch.cont_bucket, items_per_batch,
                                           left=False, pad_id=pad_id)
        item_prompt = np.zeros(items_per_batch, np.int32)
        item_prompt[:len(rows)] = rows
        logp = _continuation_logprobs(model, place(prompt_ids), place(prompt_mask), place(item_prompt),
                                      place(item_ids), place(item_mask), jnp.float32(temperature))
        out[list(idx)] = host_array(logp)[:len(idx)]
        if progress is not None:
            progress(len(idx))
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

    `options` go to `continuation_logprobs` (temperature, batch_size, buckets, mesh, ...);
    `progress(n)` is told the facts done (a fraction: batches mix facts).
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
