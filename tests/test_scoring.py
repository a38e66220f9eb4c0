"""Memorization scoring on a tiny random Llama with the real SmolLM2 tokenizer: the batched scorer
against a plain per-example computation, invariance to batching, compile counts, R and levels,
the sampling scorer, and the CLI's resumable output."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from flax import nnx

from jaxsft import config as config_lib
from jaxsft import batching, generate, models, score, scoring, tokenization
from jaxsft.data import templates as templates_lib
from jaxsft.errors import UserError
from jaxsft.models.sharding import make_mesh
from jaxsft.scoring import levels, likelihood, packed, sampling, score_facts

# Log-probabilities are float32 sums: a different batch shape may round them differently in the
# last bits (1 ulp of -40 is 4e-6), so they agree within 1e-5 or 2 ulp; probabilities within 1e-7.
RTOL = 2.5e-7
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FACTS = [
    dict(id="P17.train.0", split="train", relation="P17", subject="Painblanc", question="Which country is Painblanc located in?",
         answers=["France"]),
    dict(id="P17.train.1", split="train", relation="P17", subject="Detroit City Council",
         question="Which country is Detroit City Council located in?", answers=["United States of America"]),
    dict(id="P36.train.7", split="train", relation="P36", subject="Netherlands",
         question="What is the capital of Netherlands?", answers=["The Hague"]),
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return tokenization.load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    """A random 2-layer Llama over SmolLM2's vocabulary, saved with the tokenizer."""
    import torch
    import transformers

    directory = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128, tie_word_embeddings=True,
                                      bos_token_id=1, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # spread-out logits, so temperature matters and greedy has no near-ties
        for p in hf.parameters():
            p.copy_(0.25 * torch.randn_like(p) if p.ndim > 1 else 1.0 + 0.2 * torch.randn_like(p))
    hf.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(data=2, fsdp=4)


@pytest.fixture(scope="module")
def model(model_dir, mesh):
    return models.from_pretrained(model_dir, mesh=mesh)


@pytest.fixture(scope="module")
def pairs(tokenizer):
    return likelihood.fact_pairs(tokenizer, FACTS, templates_lib.completion_templates())[1]


PLAIN_LENGTH = 48


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def plain_logprob(model, prompt, cont, temperature):
    """One example, no batching: full forward, log_softmax(logits / T) at the continuation's tokens.

    The sequence is right-padded to one length (one compilation): causal attention keeps the
    padding out of the real positions."""
    ids, mask = np.zeros((2, 1, PLAIN_LENGTH), np.int32)
    n = len(prompt) + len(cont)
    ids[0, :n], mask[0, :n] = list(prompt) + list(cont), 1
    logits = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)[0, :n] / temperature
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    positions = np.arange(len(prompt) - 1, len(prompt) + len(cont) - 1)
    return float(logp[positions, list(cont)].sum())


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_batched_scorer_equals_plain_computation(model, mesh, pairs, temperature):
    subset = pairs[::2] if temperature == 0.7 else pairs[1::5]
    got = likelihood.continuation_logprobs(model, subset, temperature=temperature, batch_size=8,
                                           buckets=(16, 32), continuation_buckets=(4, 16), mesh=mesh)
    expected = [plain_logprob(model, p, c, temperature) for p, c in subset]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=RTOL)


def test_invariant_to_batch_mates_padding_and_buckets(model, mesh, pairs, tokenizer):
    reference = likelihood.continuation_logprobs(model, pairs, temperature=0.7, batch_size=8, buckets=(32,),
                                                 continuation_buckets=(16,), mesh=mesh)
    others = likelihood.fact_pairs(tokenizer, [dict(FACTS[0], subject="Lyon", relation="P19")],
                                   templates_lib.completion_templates())[1]
    order = np.random.default_rng(0).permutation(len(pairs))
    mixed = [pairs[i] for i in order] + others
    got = likelihood.continuation_logprobs(model, mixed, temperature=0.7, batch_size=16,
                                           buckets=(12, 48), continuation_buckets=(3, 8), mesh=mesh)
    np.testing.assert_allclose(got[:len(pairs)], reference[order], atol=1e-5, rtol=RTOL)
    np.testing.assert_allclose(np.exp(got[:len(pairs)]), np.exp(reference[order]), atol=1e-7, rtol=0)


@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_packed_layout_equals_plain_computation(model, mesh, pairs, tokenizer, temperature):
    """Every prompt with all its continuations in packed rows, several prompts a row (a 40-token
    prompt among them), filler rows in the last pass; packing into 32- and 64-token rows puts that
    prompt alone in a longer row."""
    long_prompt = tuple(range(5, 45))
    mixed = list(pairs) + [(long_prompt, (7, 8, 9)), (long_prompt, (11,))]
    stats: dict = {}
    got = likelihood.continuation_logprobs(model, mixed, temperature=temperature, batch_size=8, buckets=(16,),
                                           mesh=mesh, layout="packed", stats=stats)
    expected = [plain_logprob(model, p, c, temperature) for p, c in mixed]
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=RTOL)
    rows = packed.pack(mixed, (32, 64))
    assert {r.length for r in rows} == {32, 64} and any(max(r.group) > 1 for r in rows)
    assert stats["real_tokens"] == sum(len(r.ids) for r in packed.pack(mixed))
    assert stats["packed_tokens"] > stats["real_tokens"]  # filler rows of the last pass


def test_packing_keeps_groups_whole_and_rows_within_bounds():
    rng = np.random.default_rng(0)
    pairs = [(prompt, tuple(rng.integers(5, 900, rng.integers(1, 7)).tolist()))
             for prompt in {tuple(rng.integers(5, 900, rng.integers(4, 23)).tolist()) for _ in range(400)}
             for _ in range(rng.integers(1, 8))]
    rows = packed.pack(pairs)
    queries = np.zeros(len(pairs), int)
    for row in rows:
        assert len(row.ids) <= row.length and len(row.scored) <= row.length // 2 and len(row.queries) <= row.length
        for _, token, pair in row.queries:
            queries[pair] += 1
        starts = [k for k in range(len(row.ids)) if row.branch[k] == 0 and (k == 0 or row.group[k - 1] != row.group[k])]
        assert len(starts) == max(row.group)  # each group's prompt once, contiguous
    np.testing.assert_array_equal(queries, [len(c) for _, c in pairs])  # every token of every pair, once
    assert sum(len(r.ids) for r in rows) / sum(r.length for r in rows) > 0.9  # prompts of the demo's lengths
    assert {r.length for r in packed.pack(pairs + [(tuple(range(5, 105)), (7, 8))])} == {64, 128}  # a long one


def test_packed_layout_is_the_default_without_a_beam(model, mesh, tokenizer):
    cfg = config_lib.default_config().scoring
    cfg.update(batch_size=8, buckets=(16, 32))
    stats: dict = {}
    packed_scores = score_facts(model, tokenizer, FACTS, cfg, stats=stats)
    assert stats["packed_calls"] > 0
    cached = score_facts(model, tokenizer, FACTS, dict_config(cfg, layout="cached", prune_epsilon=0.0))
    for a, b in zip(packed_scores, cached):
        np.testing.assert_allclose(a["template_scores"], b["template_scores"], atol=1e-6)
        assert a["level"] == b["level"]
    with pytest.raises(ValueError, match="packed layout scores no leads"):
        likelihood.continuation_logprobs(model, [((1, 2), (3,))], temperature=0.7, batch_size=8, buckets=(16,),
                                         beam_width=2, beam_depth=1, stop_table=np.zeros(8, bool), layout="packed")
    assert scoring.layout(dict_config(cfg, beam_width=2, beam_depth=1)) == "cached"  # auto: a beam needs the cache
    bad = config_lib.default_config()
    bad.scoring.update(beam_width=2, beam_depth=1, layout="packed")
    with pytest.raises(UserError, match="config.scoring.layout = 'packed'"):
        config_lib.validate(bad)


def plain_next_logprobs(model, tokens, temperature):
    ids, mask = np.zeros((2, 1, PLAIN_LENGTH), np.int32)
    ids[0, :len(tokens)], mask[0, :len(tokens)] = tokens, 1
    logits = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(mask)), np.float64)[0, len(tokens) - 1]
    logits = logits / temperature
    return logits - np.logaddexp.reduce(logits)


def plain_beam(model, prompt, conts, temperature, width, depth, stop):
    """The beam's value of each continuation, one full forward per sequence: log(P(c) + sum over the
    kept leads l of P(l + c)), as `continuation_logprobs` documents it."""
    def top(seq, lp):
        logp = plain_next_logprobs(model, list(prompt) + list(seq), temperature)
        return [(seq + (int(t),), lp + logp[t]) for t in np.argsort(-logp)[:width] if not stop[t]]

    def has_prefix(seq, sequences):
        return any(seq[:k] in sequences for k in range(1, len(seq) + 1))

    counted, candidates = set(conts), []
    frontier = [(s, lp) for s, lp in top((), 0.0) if s not in counted]
    for d in range(depth):
        expansions = []
        for lead, _ in frontier:
            for c in conts:
                candidates.append((lead + c, c))
                if len(c) == 1:
                    counted.add(lead + c)
            expansions += top(lead, _)
        frontier = sorted((e for e in expansions if not has_prefix(e[0], counted)), key=lambda e: -e[1])[:width]
    value = {c: np.exp(plain_logprob(model, prompt, c, temperature)) for c in conts}
    kept = set(conts)
    for seq, c in sorted(candidates, key=lambda x: len(x[0])):
        if not has_prefix(seq, kept):
            kept.add(seq)
            value[c] += np.exp(plain_logprob(model, prompt, seq, temperature))
    return [np.log(value[c]) for c in conts]


def test_beam_equals_plain_computation(model, mesh, pairs, tokenizer):
    """Answers after a beam of leads: the batched, cached scorer against one full forward per sequence."""
    stop = generate.stop_token_table(tokenizer, [tokenizer.eos_token_id])
    stop = np.pad(stop, (0, model.cfg.vocab_size - len(stop)))
    prompts = list(dict.fromkeys(p for p, _ in pairs))[:3]
    subset = [pair for pair in pairs if pair[0] in prompts]
    stats: dict = {}
    got = likelihood.continuation_logprobs(model, subset, temperature=0.7, batch_size=8, buckets=(16, 32),
                                           beam_width=3, beam_depth=2, stop_table=stop, mesh=mesh, stats=stats)
    expected = []
    for prompt in prompts:
        expected += plain_beam(model, prompt, [c for p, c in subset if p == prompt], 0.7, 3, 2, stop)
    order = [i for prompt in prompts for i, (p, _) in enumerate(subset) if p == prompt]
    np.testing.assert_allclose(got[order], expected, atol=1e-5, rtol=RTOL)
    direct = likelihood.continuation_logprobs(model, subset, temperature=0.7, batch_size=8, buckets=(16, 32),
                                              mesh=mesh)
    assert np.all(got > direct) and stats["lead_sequences"] > 0


@contextlib.contextmanager
def count_compilations(name: str):
    """Counts XLA compilations of functions whose name contains `name`."""
    counts = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration" and name in str(kwargs.get("fun_name", "")):
            counts.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def test_compiles_once_per_bucket(model, mesh, pairs):
    """A whole run, twice (another temperature and order, pruning on): the prompt pass compiles once
    per prompt bucket, the continuation pass once per (prompt bucket, continuation bucket) at most."""
    options = dict(batch_size=8, buckets=(14, 32), continuation_buckets=(3, 16))
    plan = likelihood.plan_batches(pairs, options["batch_size"], options["buckets"])
    prompt_buckets = {b.prompt_bucket for b in plan}
    used = {(b.prompt_bucket, batching.bucket_length(len(pairs[i][1]), options["continuation_buckets"]))
            for b in plan for idx in b.items for i in idx if len(pairs[i][1]) > 1}
    assert len(plan) > 2 * len(prompt_buckets)  # many batches share a bucket
    jax.clear_caches()
    with count_compilations("_pass") as compiled:
        likelihood.continuation_logprobs(model, pairs, temperature=0.7, mesh=mesh, **options)
        likelihood.continuation_logprobs(model, pairs[::-1], temperature=0.3, mesh=mesh, prune_epsilon=1e-3,
                                         **options)
    prompt_passes = sum("prompt_pass" in name for name in compiled)
    continuation_passes = sum("continuation_pass" in name for name in compiled)
    assert 0 < prompt_passes <= len(prompt_buckets) and 0 < continuation_passes <= len(used)
    assert len(compiled) == prompt_passes + continuation_passes


def test_pruning_is_certified(model, mesh, pairs):
    """Skipped continuations move no template's summed probability by more than epsilon."""
    options = dict(temperature=0.7, batch_size=8, buckets=(16, 32), mesh=mesh)
    exact_stats, pruned_stats = {}, {}
    exact = likelihood.continuation_logprobs(model, pairs, stats=exact_stats, **options)
    epsilon = half_pruning_epsilon(model, pairs, options)
    pruned = likelihood.continuation_logprobs(model, pairs, prune_epsilon=epsilon, stats=pruned_stats, **options)
    assert exact_stats["pruned"] == 0 and exact_stats["first_token_only"] > 0
    assert 0 < pruned_stats["pruned"] < pruned_stats["continuation_pairs"] + pruned_stats["pruned"]
    assert pruned_stats["continuation_rows"] < exact_stats["continuation_rows"]
    kept = np.isfinite(pruned)
    np.testing.assert_array_equal(pruned[kept], exact[kept])
    per_prompt: dict = {}
    for (prompt, _), e, p in zip(pairs, np.exp(exact), np.exp(pruned)):
        per_prompt.setdefault(prompt, []).append((e, p))
    gaps = [sum(e - p for e, p in rows) for rows in per_prompt.values()]
    assert 0 < max(gaps) <= epsilon


def half_pruning_epsilon(model, pairs, options) -> float:
    """An epsilon that prunes about half the prompts' multi-token continuations: the median over
    prompts of the summed first-token bounds."""
    multi = [(p, c[:1]) for p, c in pairs if len(c) > 1]
    first = np.exp(likelihood.continuation_logprobs(model, multi, **options))
    bounds: dict = {}
    for (prompt, token), u in zip(multi, first):
        bounds.setdefault(prompt, {})[token] = u
    return float(np.median([sum(b.values()) for b in bounds.values()]))


def test_pruned_scores_and_levels(model, mesh, pairs, tokenizer):
    cfg = config_lib.default_config().scoring
    cfg.update(batch_size=8, buckets=(16, 32))
    epsilon = half_pruning_epsilon(model, pairs, dict(temperature=cfg.temperature, batch_size=8, buckets=(16, 32)))
    exact = score_facts(model, tokenizer, FACTS, dict_config(cfg, prune_epsilon=0.0, layout="cached"))
    stats: dict = {}
    pruned = score_facts(model, tokenizer, FACTS, dict_config(cfg, prune_epsilon=epsilon, layout="cached"), stats=stats)
    assert stats["pruned"] > 0
    for a, b in zip(exact, pruned):
        gap = np.subtract(a["template_scores"], b["template_scores"])
        assert np.all(gap >= -1e-7) and np.all(gap <= epsilon + 1e-7)
        assert a["level"] == b["level"]


def dict_config(cfg, **fields):
    cfg = cfg.copy_and_resolve_references()
    cfg.update(fields)
    return cfg


def test_levels_at_exact_thresholds():
    assert [levels.level(r) for r in (0.0, 1e-12, 0.25, 0.25 + 1e-6, 0.5, 0.5 + 1e-6, 0.75, 0.76, 1.0)] == \
        [0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert levels.level(sum([0.05] * 5)) == 1  # 0.25000000000000006 in floats
    with pytest.raises(ValueError):
        levels.level(1.5)
    assert levels.expected_level(np.zeros(21), 10) == 0
    assert levels.expected_level(np.full(21, 1e-4), 10) == 0  # 210 samples most likely miss
    assert levels.expected_level(np.full(21, 0.01), 10) == 1
    assert levels.expected_level(np.full(21, 0.5), 10) == 2
    assert levels.no_hit_probability([1.0, 0.0], 3) == 0.0
    np.testing.assert_allclose(levels.no_hit_probability([0.5, 0.2], 2), 0.25 * 0.64)


def test_continuations_and_disjoint_events():
    assert likelihood.continuations(["The Hague"])[:3] == [" The Hague", " Hague", " the Hague"]
    conts = likelihood.continuations(["United States of America"])
    assert " United States" in conts and " the United States" in conts
    prompt = (5, 6)
    pairs = [(prompt, (1, 2, 3)), (prompt, (1, 2)), (prompt, (1, 2)), ((5,), (1, 2, 3)), (prompt, (4,))]
    assert likelihood.disjoint(pairs) == [1, 3, 4]


def test_R_from_known_probabilities(monkeypatch, tokenizer):
    """p_j sums the probabilities of a template's continuations and clips at 1; R is their mean."""
    per_pair = {1: 0.3, 2: 0.45}  # probability of each continuation, by number of continuation tokens

    def fake(model, pairs, **options):
        return np.log([per_pair.get(len(c), 0.05) for _, c in pairs])

    monkeypatch.setattr(likelihood, "continuation_logprobs", fake)
    templates = {"P17": ["[X] is in", "[X] lies in"]}
    facts = [dict(FACTS[0], relation="P17"), dict(FACTS[1], relation="P17")]
    probs = likelihood.template_probabilities(None, tokenizer, facts, templates=templates)
    cells, fact_pairs = likelihood.fact_pairs(tokenizer, facts, templates)
    for f in range(2):
        expected = sum(per_pair.get(len(c), 0.05) for (ff, j), (_, c) in zip(cells, fact_pairs) if ff == f and j == 0)
        np.testing.assert_allclose(probs[f], [min(1.0, expected)] * 2)
    # " France" (1 token) + " the France" (2): 0.3 + 0.45; the four US aliases and their leads exceed 1
    np.testing.assert_allclose(probs[0], 0.75)
    np.testing.assert_allclose(probs[1], 1.0)
    cfg = config_lib.default_config().scoring
    monkeypatch.setattr(likelihood.templates_lib, "completion_templates", lambda: templates)
    rows = score_facts(None, tokenizer, facts, cfg)
    assert [r["R"] for r in rows] == pytest.approx([0.75, 1.0])
    assert [r["level"] for r in rows] == [3, 4]
    assert rows[0]["template_scores"] == pytest.approx([0.75, 0.75])


def test_sampling_near_zero_temperature_is_greedy(model_dir, tokenizer):
    model = models.from_pretrained(model_dir)
    facts = FACTS[:1]
    options = dict(max_new_tokens=4, batch_size=24, buckets=(16,))
    texts: list = []
    rates = sampling.template_hit_rates(model, tokenizer, facts, temperature=1e-4, num_samples=2,
                                        outputs=texts, **options)
    bos, eos = tokenization.special_tokens(tokenizer)
    prompts = [sampling.template_prompt(tokenizer, [] if bos is None else [bos], templates_lib.fill(t, f["subject"]))
               for f in facts for t in templates_lib.completion_templates()[f["relation"]]]
    greedy = generate.generate(model, prompts, stop_table=generate.stop_token_table(tokenizer, [eos]), **options)
    assert texts == [[sampling.completion_text(tokenizer, g[0])] * 2 for g in greedy]
    assert rates.shape == (1, 21) and set(np.unique(rates)) <= {0.0, 1.0}
    # seeded: the same samples whatever the batch size
    a, b = [], []
    sampling.template_hit_rates(model, tokenizer, facts, temperature=0.7, num_samples=2, outputs=a, **options)
    sampling.template_hit_rates(model, tokenizer, facts, temperature=0.7, num_samples=2, outputs=b,
                                **dict(options, batch_size=8))
    assert a == b and len({t for rows in a for t in rows}) > 1


def test_sampling_run_compiles_once_per_bucket(model_dir, tokenizer):
    model = models.from_pretrained(model_dir)
    facts = [FACTS[0], FACTS[2]]
    options = dict(temperature=0.7, num_samples=2, max_new_tokens=3, batch_size=8, buckets=(8, 16))
    bos, _ = tokenization.special_tokens(tokenizer)
    head = [] if bos is None else [bos]
    used = {batching.bucket_length(len(sampling.template_prompt(tokenizer, head, templates_lib.fill(t, f["subject"]))),
                                   options["buckets"])
            for f in facts for t in templates_lib.completion_templates()[f["relation"]]}
    assert len(used) == 2  # 42 prompts in 6 batches over 2 buckets
    jax.clear_caches()
    with count_compilations("_decode") as compiled:
        sampling.template_hit_rates(model, tokenizer, facts, **options)
        sampling.template_hit_rates(model, tokenizer, facts[::-1], **dict(options, temperature=0.3, seed=1))
    assert 0 < len(compiled) <= len(used)


def _config(model_dir, **scoring):
    cfg = config_lib.default_config()
    cfg.model.path = str(model_dir)
    cfg.data.relations = "P17,P19"
    cfg.data.limit_per_relation = 3
    cfg.scoring.update(dict(batch_size=8, buckets=(16, 32), shard_size=2, **scoring))
    return cfg


def test_run_resumes_after_a_kill(model_dir, tmp_path, monkeypatch):
    cfg = _config(model_dir)
    calls = []
    real = score.score_facts

    def dies_after_two_shards(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(score, "score_facts", dies_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        score.run(cfg, tmp_path)
    out = score.output_dir(tmp_path)
    first = sorted(out.glob("shard-*.parquet"))
    assert len(first) == 2 and not score.memorization_done(tmp_path)
    stamps = [os.stat(f).st_mtime_ns for f in first]

    monkeypatch.setattr(score, "score_facts", real)
    score.run(cfg, tmp_path)
    assert score.memorization_done(tmp_path)
    assert [os.stat(f).st_mtime_ns for f in first] == stamps  # kept, not scored again
    table = score.read_rows(tmp_path)
    ids = table.column("id").to_pylist()
    expected = list(score.load_facts(cfg)["id"])
    assert ids == expected and len(set(ids)) == 6
    assert table.schema.names == score.SCHEMA.names
    assert all(len(v) == 21 for v in table.column("template_scores").to_pylist())
    histogram = out.read_json("levels.json")
    assert set(histogram) == {"P17", "P19"} and sum(map(sum, histogram.values())) == 6
    assert os.path.getsize(out.path("levels.png")) > 0

    cfg.scoring.temperature = 0.5  # another scorer: refused, not mixed in
    with pytest.raises(ValueError, match="another run"):
        score.run(cfg, tmp_path)


def test_cli_sampling_writes_datasets_readable_parquet(model_dir, tmp_path):
    import datasets

    args = [sys.executable, "-m", "jaxsft.score", f"--config={REPO}/configs/demo.py", f"--workdir={tmp_path}",
            f"--config.model.path={model_dir}", "--config.data.relations=P17", "--config.data.limit_per_relation=2",
            "--config.scoring.method=sampling", "--config.scoring.num_samples=2", "--config.scoring.max_new_tokens=4",
            "--config.scoring.batch_size=8"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    done = subprocess.run(args, env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert score.memorization_done(tmp_path)
    files = sorted(str(f) for f in score.output_dir(tmp_path).glob("*.parquet"))
    ds = datasets.Dataset.from_parquet(files)
    assert ds.num_rows == 2 and ds[0]["relation"] == "P17"
    shares = np.array(ds["template_scores"])
    assert shares.shape == (2, 21) and np.all(np.isin(shares, [0.0, 0.5, 1.0]))
    assert ds["R"] == pytest.approx(shares.mean(1).tolist())
    assert pq.read_table(files[0]).schema.field("level").type == "int64"
