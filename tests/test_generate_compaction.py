"""Decoding with compaction (stopped rows leave the batch between chunks) gives token-for-token the
outputs of the loop before it, counts its row-steps right, and compiles a bounded number of times."""

from __future__ import annotations

import contextlib
import functools

import hf_models
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxsft import batching, generate, models
from jaxsft.models import Decoder, sharding

VOCAB = hf_models._COMMON["vocab_size"]
STOP = np.zeros(VOCAB, bool)
STOP[[2, 5, 17, 23, 31, 40, 58, 71, 88]] = True  # EOS and a few more: rows stop at ragged steps


# -- the loop before compaction, as it was (reference) -----------------------------------------------------

@functools.partial(nnx.jit, static_argnames=("max_new_tokens", "num_samples", "greedy", "top_k", "top_p"))
def _reference_decode(model: Decoder, ids, mask, row_keys, stop, temperature, *, max_new_tokens: int,
                      num_samples: int, greedy: bool, top_k: int, top_p: float):
    batch, length = ids.shape
    cache = model.init_cache(batch, length + max_new_tokens - 1)
    hidden, cache = model.hidden_states(ids, mask, cache=cache)
    logits = model.unembed(hidden[:, -1]).astype(jnp.float32)
    if num_samples > 1:
        cache, logits = generate._repeat_cache(cache, num_samples), jnp.repeat(logits, num_samples, axis=0)
    rows = batch * num_samples
    keys = jax.vmap(lambda k, s: jax.random.fold_in(k, s))(
        jnp.repeat(row_keys, num_samples, axis=0), jnp.tile(jnp.arange(num_samples), batch))

    def choose(state):
        t, cache, logits, done, out = state
        step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)
        token = jnp.where(done, 0, generate._choose(logits, step_keys, temperature, top_k, top_p, greedy))
        return token, out.at[:, t].set(jnp.where(done, -1, token)), done | stop[token]

    def body(state):
        token, out, done = choose(state)
        hidden, cache = model.hidden_states(token[:, None], jnp.ones((rows, 1), jnp.int32), cache=state[1])
        return state[0] + 1, cache, model.unembed(hidden[:, 0]).astype(jnp.float32), done, out

    def cond(state):
        return (state[0] < max_new_tokens - 1) & ~jnp.all(state[3])

    out = jnp.full((rows, max_new_tokens), -1, jnp.int32)
    state = (jnp.zeros((), jnp.int32), cache, logits, jnp.zeros((rows,), bool), out)
    return choose(jax.lax.while_loop(cond, body, state))[1]


def reference_generate(model, prompts, *, stop_table, max_new_tokens, buckets, batch_size, temperature=0.0,
                       top_k=0, top_p=1.0, num_samples=1, seed=0, row_ids=None, pad_id=0):
    greedy = temperature == 0.0
    if greedy:
        top_k, top_p = 0, 1.0
    row_ids = list(range(len(prompts))) if row_ids is None else list(row_ids)
    base = jax.random.key(seed)
    stop = jnp.asarray(np.pad(stop_table, (0, max(0, model.cfg.vocab_size - len(stop_table)))))
    results = [[] for _ in prompts]
    for bucket, idx in batching.bucketed_batches([len(p) for p in prompts], buckets, batch_size):
        ids, mask = batching.pad([prompts[i] for i in idx], bucket, batch_size, left=True, pad_id=pad_id)
        mask[len(idx):, -1] = 1
        keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(
            jnp.asarray([row_ids[i] for i in idx] + [0] * (batch_size - len(idx))))
        out = sharding.host_array(_reference_decode(
            model, jnp.asarray(ids), jnp.asarray(mask), keys, stop, jnp.float32(max(temperature, 1e-6)),
            max_new_tokens=max_new_tokens, num_samples=num_samples, greedy=greedy, top_k=top_k, top_p=float(top_p)))
        for r, i in enumerate(idx):
            for s in range(num_samples):
                results[i].append([int(x) for x in out[r * num_samples + s] if x >= 0])
    return results


# -- fixtures ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama")
    hf_models.build("llama2", directory)
    return directory


@pytest.fixture(scope="module")
def model(model_dir):
    return models.from_pretrained(model_dir)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, VOCAB, rng.integers(2, 14)).tolist()] for _ in range(n)]


OPTIONS = dict(stop_table=STOP, max_new_tokens=12, buckets=(8, 16), batch_size=10)  # greedy: 10 rows, bucket 8


def simulated_row_steps(lengths: list[int], full: int, ladder: tuple[int, ...], last: int) -> int:
    """Row-steps of the chunk schedule, from each row's number of tokens: after choosing token t a row
    with n tokens still runs iff n > t + 1; a chunk ends when the running rows fit a smaller bucket."""
    size, t, steps = full, 0, 0
    while True:
        running = sum(n > t + 1 for n in lengths)
        if t == last or running == 0:
            return steps
        smaller = [b for b in ladder if b < size]
        if smaller and running <= smaller[0]:
            size = min(b for b in ladder if b >= running)
            continue
        steps += size
        t += 1


# -- tests ------------------------------------------------------------------------------------------------

def test_row_buckets():
    assert generate.row_buckets(630) == (512, 368, 256, 184, 128, 96, 64, 48, 32, 24, 16, 8)
    assert generate.row_buckets(630, per_octave=1) == (512, 256, 128, 64, 32, 16, 8)
    assert generate.row_buckets(64, shards=8) == (48, 32, 24, 16, 8)
    assert generate.row_buckets(40, shards=6) == (36, 24, 12)  # multiples of the data shards
    assert generate.row_buckets(8) == ()


@pytest.mark.parametrize("temperature,num_samples,top_k,top_p", [
    (0.0, 1, 0, 1.0), (1.0, 4, 0, 1.0), (1.0, 4, 7, 1.0), (1.0, 4, 0, 0.8), (1.3, 3, 9, 0.9)])
def test_same_tokens_as_the_loop_before(model, temperature, num_samples, top_k, top_p):
    prompts = _prompts(23)  # 2 prompt buckets, batches with fillers
    options = dict(OPTIONS, temperature=temperature, num_samples=num_samples, top_k=top_k, top_p=top_p, seed=3,
                   row_ids=[1000 + 7 * i for i in range(len(prompts))])
    stats: dict = {}
    got = generate.generate(model, prompts, stats=stats, **options)
    assert got == reference_generate(model, prompts, **options)
    assert got == generate.generate(model, prompts, compact=False, **options)
    lengths = [len(row) for rows in got for row in rows]
    assert len(set(lengths)) > 3 and min(lengths) < 4 and max(lengths) == OPTIONS["max_new_tokens"]  # ragged
    assert all(STOP[row[-1]] or len(row) == OPTIONS["max_new_tokens"] for rows in got for row in rows)
    # the counts: every batch simulated from its rows' lengths
    full, last = OPTIONS["batch_size"] * num_samples, OPTIONS["max_new_tokens"] - 1
    ladder = generate.row_buckets(full)
    plan = batching.bucketed_batches([len(p) for p in prompts], OPTIONS["buckets"], OPTIONS["batch_size"])
    batches = [[len(row) for i in idx for row in got[i]] for _, idx in plan]
    assert stats["batches"] == len(batches) >= 3 and stats["rows"] == len(prompts) * num_samples
    assert stats["running_row_steps"] == sum(n - 1 for n in lengths)
    assert stats["uncompacted_row_steps"] == sum(full * min(last, max(b)) for b in batches)
    assert stats["row_steps"] == sum(simulated_row_steps(b, full, ladder, last) for b in batches)
    assert stats["running_row_steps"] <= stats["row_steps"] < stats["uncompacted_row_steps"]
    assert stats["compactions"] > 0


def test_sharded_model_same_tokens(model_dir):
    mesh = sharding.make_mesh(data=2, fsdp=4)
    model = models.from_pretrained(model_dir, mesh=mesh)
    assert generate.data_shards(model) == 8
    prompts = _prompts(10, seed=1)
    options = dict(OPTIONS, batch_size=4, temperature=0.9, num_samples=6, seed=5)
    stats: dict = {}
    got = generate.generate(model, prompts, stats=stats, **options)  # 24 rows, buckets of 16 and 8
    assert got == reference_generate(model, prompts, **options)
    assert stats["compactions"] > 0


@contextlib.contextmanager
def compilations():
    """Names of the functions XLA compiles meanwhile."""
    names: list[str] = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            names.append(str(kwargs.get("fun_name", "")))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_compilations_bounded_whatever_the_stops(model):
    """One `_decode` per (prompt bucket, batch, settings); one `_resume` per (row bucket, cache slots,
    settings); one `_gather` per (bucket, smaller bucket), whatever the stop patterns."""
    options = dict(OPTIONS, buckets=(16,), batch_size=8, temperature=1.0, num_samples=4)  # 32 rows: 24, 16, 8
    jax.clear_caches()
    patterns, stats = set(), {}
    with compilations() as names:
        for seed in range(10):
            for n in (8, 3):  # a full batch, and a part-filled one (12 rows: compacted before its first step)
                out = generate.generate(model, _prompts(n, seed), seed=seed, stats=stats, **options)
                patterns.add(tuple(len(row) for rows in out for row in rows))
    assert len(patterns) == 20 and stats["compactions"] >= 20
    compiled = {name: sum(n == f"jit({name})" for n in names) for name in ("_decode", "_resume", "_gather")}
    assert compiled["_decode"] == 1 and 1 <= compiled["_resume"] <= 3 and 1 <= compiled["_gather"] <= 6, names
