"""Batched decoding with a KV cache: greedy, or sampling with temperature / top-k / top-p.

Prompts are left-padded into length buckets; each prompt is prefilled once and its cache is shared
by its `num_samples` samples. Each row samples from its own key (`fold_in(seed, row_id)`), so the
outputs do not depend on batch mates, padding or bucket.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsft import batching
from jaxsft.models import Decoder, KVCache, sharding


def stop_token_table(tokenizer, eos_ids: Sequence[int], stop_on_newline: bool = True) -> np.ndarray:
    """[vocab] bool: the tokens that end an answer (EOS, and any token whose text has a newline)."""
    size = max(len(tokenizer), max(eos_ids, default=0) + 1)
    table = np.zeros(size, bool)
    table[list(eos_ids)] = True
    if stop_on_newline:
        for token, i in tokenizer.get_vocab().items():
            if "\n" in tokenizer.convert_tokens_to_string([token]):
                table[i] = True
    return table


def _choose(logits: jax.Array, keys: jax.Array, temperature: jax.Array, top_k: int, top_p: float,
            greedy: bool) -> jax.Array:
    """The next token of each row. `top_k`, `top_p` and `greedy` are static: with both filters off
    (the protocol's setting) a step is one gumbel-max draw over logits / T, with no sort."""
    if greedy:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k or top_p < 1.0:
        # the candidates in decreasing order: only the k best when top-k is on, else a full sort
        best = jax.lax.top_k(logits, top_k)[0] if top_k else -jnp.sort(-logits, axis=-1)
        keep = jnp.ones(best.shape, bool)
        if top_p < 1.0:  # the smallest prefix whose mass reaches top_p (the first token always stays)
            probs = jax.nn.softmax(best, -1)
            keep = jnp.cumsum(probs, -1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, best, jnp.inf), -1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def _repeat_cache(cache: KVCache, n: int) -> KVCache:
    return KVCache(jnp.repeat(cache.k, n, axis=1), jnp.repeat(cache.v, n, axis=1),
                   jnp.repeat(cache.valid, n, axis=0), cache.index)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "num_samples", "greedy", "top_k", "top_p"))
def _decode(model: Decoder, ids: jax.Array, mask: jax.Array, row_keys: jax.Array, stop: jax.Array,
            temperature: jax.Array, *, max_new_tokens: int, num_samples: int, greedy: bool, top_k: int,
            top_p: float) -> jax.Array:
    batch, length = ids.shape
    cache = model.init_cache(batch, length + max_new_tokens - 1)  # the last token is never fed back
    hidden, cache = model.hidden_states(ids, mask, cache=cache)
    logits = model.unembed(hidden[:, -1]).astype(jnp.float32)
    if num_samples > 1:
        cache, logits = _repeat_cache(cache, num_samples), jnp.repeat(logits, num_samples, axis=0)
    rows = batch * num_samples
    keys = jax.vmap(lambda k, s: jax.random.fold_in(k, s))(
        jnp.repeat(row_keys, num_samples, axis=0), jnp.tile(jnp.arange(num_samples), batch))

    def choose(state):  # token t of every row into `out`; stopped rows get -1
        t, cache, logits, done, out = state
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
        token = jnp.where(done, 0, _choose(logits, step_keys, temperature, top_k, top_p, greedy))
        return token, out.at[:, t].set(jnp.where(done, -1, token)), done | stop[token]

    def body(state):
        token, out, done = choose(state)
        hidden, cache = model.hidden_states(token[:, None], jnp.ones((rows, 1), jnp.int32), cache=state[1])
        return state[0] + 1, cache, model.unembed(hidden[:, 0]).astype(jnp.float32), done, out

    def cond(state):
        return (state[0] < max_new_tokens - 1) & ~jnp.all(state[3])

    out = jnp.full((rows, max_new_tokens), -1, jnp.int32)
    state = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((rows,), bool), out)
    # the last token is chosen after the loop, with no forward pass after it (when every row has
    # stopped before, it writes -1s only)
    return choose(jax.lax.while_loop(cond, body, state))[1]


def generate(model: Decoder, prompts: Sequence[Sequence[int]], *, stop_table: np.ndarray, max_new_tokens: int,
             buckets: Sequence[int], batch_size: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, num_samples: int = 1, seed: int = 0, row_ids: Sequence[int] | None = None,
             pad_id: int = 0) -> list[list[list[int]]]:
    """New tokens for each prompt: `num_samples` lists per prompt, each ending at (and keeping) its
    stop token. `temperature == 0` is greedy. `row_ids` (default: the prompt index) seed each prompt's
    samples, so a prompt draws the same samples whatever its batch."""
    greedy = temperature == 0.0
    if greedy:  # the filters do not apply: one compilation whatever they are
        top_k, top_p = 0, 1.0
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    base = jax.random.key(seed)
    stop = jnp.asarray(np.pad(stop_table, (0, max(0, model.cfg.vocab_size - len(stop_table)))))
    results: list[list[list[int]]] = [[] for _ in prompts]
    for bucket, idx in batching.bucketed_batches([len(p) for p in prompts], buckets, batch_size):
        ids, mask = batching.pad([prompts[i] for i in idx], bucket, batch_size, left=True, pad_id=pad_id)
        mask[len(idx):, -1] = 1  # filler rows decode harmlessly from one token
        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(
            jnp.asarray([row_ids[i] for i in idx] + [0] * (batch_size - len(idx))))
        out = sharding.host_array(_decode(model, jnp.asarray(ids), jnp.asarray(mask), keys, stop,
                                 jnp.float32(max(temperature, 1e-6)), max_new_tokens=max_new_tokens,
                                 num_samples=num_samples, greedy=greedy, top_k=top_k, top_p=float(top_p)))
        for r, i in enumerate(idx):
            for s in range(num_samples):
                row = out[r * num_samples + s]
                results[i].append([int(x) for x in row if x >= 0])
    return results
