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
probability of their union.

Answers after a lead (`beam_width` = w, `beam_depth` = d > 0). Sampling also counts "the city of
Vilnius". A beam of leads is grown from the prompt: the w most probable first tokens, then, up to
d tokens, the w most probable one-token extensions of the kept leads (by P_T of the whole lead). A
lead never holds a stop token (EOS or a newline: the completion would end there) and never starts
with a sequence already counted. Every alias continuation c is also scored after every kept lead l,
and p_j sums P_T(c) and every P_T(l + c), over sequences none of which extends another (so again
disjoint events and the probability of their union). With d = 0 (the default) only answers at the
start count.

What p_j does not count: answers after a lead outside the beam (a later lead, or one of low
probability), and spellings that are not an alias or not tokenised the canonical way; what it counts
that sampling does not: a completion where the alias is the start of a longer word. Levels come from
the p_j as the level the sampling protocol most likely gives (`levels.expected_level`), so that
level 0 exists. `benchmarks/agreement.py` measures all of this against the protocol itself.

How it runs. Without a beam, by default (`scoring.layout = "auto"`), in the packed layout
(`jaxsft.scoring.packed`): each prompt and all its continuations in one row, several prompts a row,
one jitted pass per row batch; exact, so nothing is pruned. The cached layout (`layout="cached"`,
which a beam needs) runs two jitted passes per batch of prompts. The prompt pass prefills `batch_size`
distinct prompts, right-padded to a length bucket, and unembeds each prompt's last position once:
that gives every continuation's first-token log-probability (single-token continuations are then
done). The prompts' KV cache stays on the device; the continuation pass gathers it for each
remaining continuation (grouped by continuation length bucket, `items_per_call` rows a call) and
scores tokens 2..n, unembedding only those positions. With a beam, the prompt pass also returns
the w most probable first tokens, and one lead pass per depth feeds the leads after the cached
prompts and returns, after each lead, the first-token log-probabilities of the continuations and
the w most probable next tokens. A run compiles the prompt pass once per prompt bucket, the lead
pass once per (prompt bucket, depth) and the continuation pass once per (prompt bucket,
continuation bucket) used.

Certified pruning (`prune_epsilon` = e > 0, cached layout). A continuation's probability is at most its first
token's: P_T(c) <= P_T(c_1). The kept continuations of a template are disjoint events, so those
starting with the same token t together have probability at most P_T(t). For each prompt, the
groups of multi-token continuations are sorted by U_t = P_T(t) (known after the prompt pass) and
the smallest are skipped while the sum of their U_t stays <= e; skipped continuations count 0
(log-probability -inf). After a lead l the bound is P_T(l + c_1), known from the lead pass. Hence,
for every template, the computed p_j and the exact one (same beam) satisfy
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

from jaxsft import batching, generate, tokenization
from jaxsft.data import answers as answers_lib
from jaxsft.data import templates as templates_lib
from jaxsft.models import Decoder, KVCache
from jaxsft.models.sharding import batch_sharding, global_array, host_array
from jaxsft.scoring import packed

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
                temperature: jax.Array, width: int = 0) -> tuple[KVCache, jax.Array, tuple[jax.Array, jax.Array]]:
    """Prefill right-padded prompts [P, Lp]; log P_T of the tokens first_ids [P, K] after each prompt,
    and the `width` most probable next tokens (ids, log P_T) [P, width] (the leads of depth 1).

    Returns the prompts' KV cache (Lp slots), float32 [P, K] and the top tokens.
    """
    n_prompts, prompt_len = prompt_ids.shape
    hidden, cache = model.hidden_states(prompt_ids, prompt_mask, cache=model.init_cache(n_prompts, prompt_len))
    last = jnp.take_along_axis(hidden, (prompt_mask.sum(-1) - 1)[:, None, None], axis=1)[:, 0]  # [P, E]
    return (cache,) + _next_token_logprobs(model, last, first_ids, temperature, width)


def _next_token_logprobs(model: Decoder, hidden: jax.Array, query_ids: jax.Array, temperature: jax.Array,
                         width: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """log P_T of query_ids [R, K] after hidden [R, E], and the `width` most probable tokens."""
    logits = model.unembed(hidden.astype(jnp.float32)).astype(jnp.float32) / temperature
    logp = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    top_logp, top_ids = jax.lax.top_k(logp, width) if width else (logp[:, :0], jnp.zeros((len(logp), 0), jnp.int32))
    return jnp.take_along_axis(logp, query_ids, axis=-1), (top_ids.astype(jnp.int32), top_logp)


def _cache_rows(cache: KVCache, item_prompt: jax.Array, pad: int) -> KVCache:
    """The prompt cache rows of each item, with `pad` free slots after them."""
    def rows(c: jax.Array) -> jax.Array:  # [L, P, Lp, ...] -> [L, I, Lp + pad, ...]
        return jnp.pad(c[:, item_prompt], ((0, 0), (0, 0), (0, pad)) + ((0, 0),) * (c.ndim - 3))

    return KVCache(rows(cache.k), rows(cache.v), jnp.pad(cache.valid[item_prompt], ((0, 0), (0, pad))), cache.index)


def lead_pass(model: Decoder, cache: KVCache, item_prompt: jax.Array, lead_ids: jax.Array, query_ids: jax.Array,
              temperature: jax.Array, width: int) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """After each lead lead_ids [I, D] (all of D tokens) following its prompt's cache row: log P_T of
    query_ids [I, K], and the `width` most probable next tokens (the leads one token longer)."""
    hidden, _ = model.hidden_states(lead_ids, jnp.ones(lead_ids.shape, jnp.int32),
                                    cache=_cache_rows(cache, item_prompt, lead_ids.shape[1]))
    return _next_token_logprobs(model, hidden[:, -1], query_ids, temperature, width)


def continuation_pass(model: Decoder, cache: KVCache, item_prompt: jax.Array, item_ids: jax.Array,
                      item_mask: jax.Array, temperature: jax.Array) -> jax.Array:
    """Sum of log P_T of tokens 2..n of each continuation item_ids [I, Lc] (right-padded, Lc >= 2)
    after its prompt's cache row `item_prompt`: tokens 1..n-1 are fed, float32 [I]."""
    items_cache = _cache_rows(cache, item_prompt, item_ids.shape[1] - 1)
    inputs_mask = item_mask[:, 1:]
    hidden, _ = model.hidden_states(item_ids[:, :-1], inputs_mask, cache=items_cache)
    token_logp = _log_softmax_at(model, hidden, item_ids[:, 1:, None], temperature)[..., 0]
    return jnp.where(inputs_mask.astype(bool), token_logp, 0.0).sum(-1)


_prompt_pass = nnx.jit(prompt_pass, static_argnames="width")
_lead_pass = nnx.jit(lead_pass, static_argnames="width")
_continuation_pass = nnx.jit(continuation_pass)


@nnx.jit
def _continuation_logprobs(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array, item_prompt: jax.Array,
                           item_ids: jax.Array, item_mask: jax.Array, temperature: jax.Array) -> jax.Array:
    """Both passes of one batch in one program, log P_T of each whole continuation [I] (item_ids
    [I, Lc], Lc >= 2): what `jaxsft.compile` sizes for the accelerator's memory."""
    cache, first, _ = prompt_pass(model, prompt_ids, prompt_mask,
                                  jnp.broadcast_to(item_ids[:, 0], (prompt_ids.shape[0], item_ids.shape[0])), temperature)
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


@dataclasses.dataclass(frozen=True)
class _Candidate:
    """A token sequence whose probability counts for pair `pair`: a lead (maybe empty), then the pair's
    continuation. `known` is log P_T of the lead and the continuation's first token (exact when the
    continuation has one token, else an upper bound of the sequence's log-probability); `first` is
    log P_T of the sequence's first token (from the prompt pass)."""

    pair: int
    tokens: tuple[int, ...]
    lead: int  # tokens of lead
    known: float
    first: float


def prune(candidates: Sequence[_Candidate], budget: float) -> tuple[set[int], float]:
    """Indices of the candidates (multi-token ones of one prompt) to skip, and the budget left: whole
    groups of one known prefix (lead + first token), smallest bound P_T(prefix) first, while the
    bounds' sum stays in `budget`."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for k, c in enumerate(candidates):
        groups.setdefault(c.tokens[:c.lead + 1], []).append(k)
    skipped: set[int] = set()
    for prefix in sorted(groups, key=lambda p: candidates[groups[p][0]].known):
        bound = float(np.exp(candidates[groups[prefix][0]].known))
        if bound > budget:
            break
        budget -= bound
        skipped.update(groups[prefix])
    return skipped, budget


def _has_prefix_in(tokens: tuple[int, ...], sequences: set[tuple[int, ...]]) -> bool:
    return any(tokens[:k] in sequences for k in range(1, len(tokens) + 1))


def _lead_candidates(model: Decoder, cache: KVCache, batch: _Batch, pairs: Sequence[Pair], top: tuple[np.ndarray,
                     np.ndarray], direct: list[set[tuple[int, ...]]], *, width: int, depth: int, stop: np.ndarray,
                     temperature: jax.Array, place: Callable, counts: dict) -> list[list[_Candidate]]:
    """Per prompt row, the candidates `lead + continuation` of a beam of leads: the `width` most
    probable first tokens, then for each depth up to `depth` the `width` most probable one-token
    extensions of the kept leads. A lead never holds a stop token, nor starts with a sequence already
    counted (then everything after it is counted already)."""
    rows = len(batch.prompts)
    top_ids, top_logp = top
    first_of = [dict(zip(top_ids[r].tolist(), top_logp[r].tolist())) for r in range(rows)]
    counted = [set(d) for d in direct]
    frontier = [[((t,), lp) for t, lp in first_of[r].items() if not stop[t] and (t,) not in counted[r]]
                for r in range(rows)]
    out: list[list[_Candidate]] = [[] for _ in range(rows)]
    chunk = len(top_ids)  # the prompt batch's rows: a multiple of the mesh's data shards
    for d in range(1, depth + 1):
        leads = [(r, lead, lp) for r in range(rows) for lead, lp in frontier[r]]
        if not leads:
            break
        query = np.zeros((len(leads), FIRST_TOKENS), np.int32)
        for k, (r, _, _) in enumerate(leads):
            query[k, :len(batch.items[r])] = [pairs[i][1][0] for i in batch.items[r]]
        logp, next_ids, next_logp = [], [], []
        for start in range(0, len(leads), chunk):  # one compiled shape per (prompt bucket, depth)
            part = leads[start:start + chunk]
            ids, item_prompt, q = (np.zeros((chunk, d), np.int32), np.zeros(chunk, np.int32),
                                   np.zeros((chunk, FIRST_TOKENS), np.int32))
            ids[:len(part)] = [lead for _, lead, _ in part]
            item_prompt[:len(part)] = [r for r, _, _ in part]
            q[:len(part)] = query[start:start + len(part)]
            lq, (ni, nl) = _lead_pass(model, cache, place(item_prompt), place(ids), place(q), temperature,
                                      width=width)
            logp.append(host_array(lq)[:len(part)])
            next_ids.append(host_array(ni)[:len(part)])
            next_logp.append(host_array(nl)[:len(part)])
            counts["lead_rows"] += chunk
        logp, next_ids, next_logp = map(np.concatenate, (logp, next_ids, next_logp))
        expansions: list[list[tuple[tuple[int, ...], float]]] = [[] for _ in range(rows)]
        for k, (r, lead, lp) in enumerate(leads):
            for q, i in enumerate(batch.items[r]):
                cont = pairs[i][1]
                out[r].append(_Candidate(i, lead + cont, len(lead), lp + float(logp[k, q]), first_of[r][lead[0]]))
                if len(cont) == 1:
                    counted[r].add(lead + cont)
            expansions[r] += [(lead + (int(t),), lp + float(tl)) for t, tl in zip(next_ids[k], next_logp[k])
                              if not stop[t]]
        frontier = [sorted((e for e in expansions[r] if not _has_prefix_in(e[0], counted[r])),
                           key=lambda e: -e[1])[:width] for r in range(rows)]
    counts["leads"] += sum(len(c) for c in out)
    return out


def default_items_per_call(batch_size: int, shards: int) -> int:
    """Rows a continuation (or packed) pass takes by default: a quarter of `batch_size`, rounded up
    to a multiple of the mesh's data shards."""
    return -(-max(batch_size // 4, 1) // shards) * shards


def continuation_logprobs(model: Decoder, pairs: Sequence[Pair], *, temperature: float, batch_size: int,
                          buckets: Sequence[int], continuation_buckets: Sequence[int] = CONTINUATION_BUCKETS,
                          items_per_call: int | None = None, prune_epsilon: float = 0.0, beam_width: int = 0,
                          beam_depth: int = 0, stop_table: np.ndarray | None = None,
                          mesh: jax.sharding.Mesh | None = None, pad_id: int = 0, layout: str = "cached",
                          progress: Callable[[int], None] | None = None, stats: dict | None = None) -> np.ndarray:
    """log P_T(continuation | prompt) for each (prompt ids, continuation ids) pair, float64 [n].

    `layout="packed"` scores each prompt with all its continuations in one packed row
    (`jaxsft.scoring.packed`: exact, no pruning, no leads, `items_per_call` rows a pass); "cached"
    (below) runs the prompt pass, then the continuation passes on the cached prompts.

    With `beam_depth` > 0, a pair's value also counts the continuation after each lead of a beam of
    `beam_width` leads per depth (`_lead_candidates`; a lead never holds a token of `stop_table`): the
    log of P_T(continuation) + sum over the leads l of P_T(l + continuation), over sequences of one
    prompt none of which extends another (disjoint events).
    With `prune_epsilon` > 0, sequences that cannot move their prompt's summed probability by more
    (module docstring) are skipped and count 0 (a pair with nothing left gets -inf). `items_per_call`
    continuation rows run per continuation pass (default: a quarter of `batch_size`, a multiple of the
    mesh's data shards: small calls waste few padding rows per length bucket).
    `progress(n)` is called after each batch with the number of pairs it finished; `stats`, when
    given, receives the counts of the work done and skipped.
    """
    if any(not prompt or not cont for prompt, cont in pairs):
        raise ValueError("every pair needs at least one prompt token and one continuation token")
    if beam_depth and (beam_width < 1 or stop_table is None):
        raise ValueError("leads need beam_width >= 1 and the stop_table")
    shards = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % shards:
        raise ValueError(f"batch_size {batch_size} is not a multiple of the {shards} data shards of the mesh")
    items_per_call = items_per_call or default_items_per_call(batch_size, shards)
    if layout == "packed":
        if beam_depth:
            raise ValueError("the packed layout scores no leads: use layout='cached' with a beam")
        return packed.logprobs(model, pairs, temperature=temperature, rows_per_call=items_per_call, mesh=mesh,
                               progress=progress, stats=stats)
    if layout != "cached":
        raise ValueError(f"unknown layout {layout!r}: 'cached' or 'packed'")
    place = (lambda x: global_array(x, batch_sharding(mesh, x.ndim))) if mesh is not None else jnp.asarray
    temperature = jnp.float32(temperature)
    width = beam_width if beam_depth else 0
    stop = None if stop_table is None else np.pad(stop_table, (0, max(0, model.cfg.vocab_size - len(stop_table))))
    counts = dict(pairs=len(pairs), prompt_rows=0, prompt_batches=0, first_token_only=0, pruned=0,
                  continuation_pairs=0, continuation_rows=0, continuation_calls=0, lead_rows=0, leads=0,
                  lead_sequences=0)
    out = np.zeros(len(pairs), np.float64)
    after_leads: list[list[float]] = [[] for _ in pairs]
    budget: dict[tuple[int, ...], float] = {}
    for batch in plan_batches(pairs, batch_size, buckets):
        prompt_ids, prompt_mask = batching.pad(batch.prompts, batch.prompt_bucket, batch_size, left=False,
                                               pad_id=pad_id)
        prompt_mask[len(batch.prompts):, 0] = 1  # filler rows attend to one token
        first_ids = np.zeros((batch_size, FIRST_TOKENS), np.int32)
        for row, idx in enumerate(batch.items):
            first_ids[row, :len(idx)] = [pairs[i][1][0] for i in idx]
        cache, first, top = _prompt_pass(model, place(prompt_ids), place(prompt_mask), place(first_ids), temperature,
                                         width=width)
        first = host_array(first)
        first_logp = {i: float(first[row, k]) for row, idx in enumerate(batch.items) for k, i in enumerate(idx)}
        out[list(first_logp)] = list(first_logp.values())
        direct = [[_Candidate(i, pairs[i][1], 0, first_logp[i], first_logp[i]) for i in idx] for idx in batch.items]
        leads = [[] for _ in direct]
        if beam_depth:
            leads = _lead_candidates(model, cache, batch, pairs, tuple(map(host_array, top)),
                                     [{c.tokens for c in d} for d in direct], width=width, depth=beam_depth,
                                     stop=stop, temperature=temperature, place=place, counts=counts)
        rest: list[tuple[int, _Candidate]] = []  # (prompt row, sequence) of the continuation pass
        for row, (prompt, row_direct, row_leads) in enumerate(zip(batch.prompts, direct, leads)):
            kept = {c.tokens for c in row_direct}
            sequences = list(row_direct)
            for c in sorted(row_leads, key=lambda c: len(c.tokens)):  # disjoint: none extends another
                if not _has_prefix_in(c.tokens, kept):
                    kept.add(c.tokens)
                    sequences.append(c)
            counts["lead_sequences"] += len(sequences) - len(row_direct)
            for c in sequences[len(row_direct):]:
                if len(c.tokens) == c.lead + 1:  # the continuation's one token: exact
                    after_leads[c.pair].append(c.known)
            multi = [c for c in sequences if len(c.tokens) > c.lead + 1]
            skipped: set[int] = set()
            if prune_epsilon > 0:
                skipped, budget[prompt] = prune(multi, budget.get(prompt, prune_epsilon))
                out[[c.pair for k, c in enumerate(multi) if k in skipped and not c.lead]] = -np.inf
            rest += [(row, c) for k, c in enumerate(multi) if k not in skipped]
            counts["first_token_only"] += len(row_direct) - sum(1 for c in multi if not c.lead)
            counts["pruned"] += len(skipped)
        rest.sort(key=lambda r: len(r[1].tokens))
        for bucket, group in itertools.groupby(rest, key=lambda r: batching.bucket_length(len(r[1].tokens),
                                                                                         continuation_buckets)):
            group = list(group)
            for start in range(0, len(group), items_per_call):
                rows, seqs = zip(*group[start:start + items_per_call])
                item_ids, item_mask = batching.pad([c.tokens for c in seqs], bucket, items_per_call, left=False,
                                                   pad_id=pad_id)
                item_prompt = np.zeros(items_per_call, np.int32)
                item_prompt[:len(rows)] = rows
                logp = host_array(_continuation_pass(model, cache, place(item_prompt), place(item_ids),
                                                     place(item_mask), temperature))
                for c, value in zip(seqs, logp):
                    if c.lead:
                        after_leads[c.pair].append(c.first + float(value))
                    else:
                        out[c.pair] += value
                counts["continuation_calls"] += 1
                counts["continuation_rows"] += items_per_call
        counts["continuation_pairs"] += len(rest)
        counts["prompt_rows"] += batch_size
        counts["prompt_batches"] += 1
        if progress is not None:
            progress(sum(map(len, batch.items)))
    for i, values in enumerate(after_leads):
        if values:
            out[i] = np.logaddexp.reduce([out[i], *values])
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
    if options.get("beam_depth"):
        options.setdefault("stop_table", generate.stop_token_table(tokenizer, [tokenization.special_tokens(tokenizer)[1]]))
    logp = continuation_logprobs(model, pairs, **options, progress=progress and (lambda n: progress(n * per_fact)))
    np.add.at(probs, tuple(np.array(cells).T), np.exp(logp))
    return np.minimum(probs, 1.0)
