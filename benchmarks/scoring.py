"""The likelihood scorer against the paper's sampling protocol, on the real SmolLM2-135M.

    python benchmarks/scoring.py --out /tmp/scoring.json [--facts-per-relation 50] [--full-facts 8]

Stages (each adds to the JSON as it finishes):
1. likelihood: R of the in-domain train facts (`--facts-per-relation` per relation), timed, with
   the number of compilations;
2. torch: the same log-probabilities with transformers + PyTorch (float32, same GGUF, scored
   positions only, length-sorted batches), on the pairs of the first `--torch-facts` facts: the
   throughput ratio and the largest difference;
3. agreement: sampling on every fact with `--agree-samples` samples per template and at most
   `--agree-tokens` tokens (the full protocol over 500 facts takes hours on 2 CPU cores):
   Spearman of R, exact and within-one level agreement (the likelihood level being the one this
   protocol most likely gives), the same figures for a perfect estimator (protocol simulated from
   the likelihood's p_j: the ceiling sampling noise allows), calibration of p_j against hit rates,
   and where the answers of hits start in the completions;
4. sampling, full protocol (10 samples x 21 templates, 32 tokens) on the first `--full-facts` facts:
   wall time per fact against the likelihood's.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
from scipy import stats

from jaxsft.models import sources
from jaxsft import config as config_lib
from jaxsft import models, tokenization
from jaxsft.data import answers as answers_lib
from jaxsft.data import entity_questions
from jaxsft.data import templates as templates_lib
from jaxsft.data.relations import ID_RELATIONS
from jaxsft.scoring import levels, likelihood, sampling


class CompileCounter:
    """Counts XLA compilations of the functions whose name contains `name`."""

    def __init__(self, name: str):
        self.name, self.count = name, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if event == "/jax/core/compile/backend_compile_duration" and self.name in str(kwargs.get("fun_name", "")):
            self.count += 1


def torch_logprobs(model, pairs, temperature: float, batch_size: int) -> np.ndarray:
    """log P_T(continuation | prompt) with transformers: full sequences, right-padded, sorted by length."""
    import torch

    device = next(model.parameters()).device
    out = np.zeros(len(pairs))
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            seqs = [list(pairs[i][0]) + list(pairs[i][1][:-1]) for i in idx]
            length = max(map(len, seqs))
            ids = torch.zeros((len(seqs), length), dtype=torch.long)
            mask = torch.zeros((len(seqs), length), dtype=torch.long)
            rows, cols, targets = [], [], []
            for r, (i, seq) in enumerate(zip(idx, seqs)):
                ids[r, :len(seq)], mask[r, :len(seq)] = torch.tensor(seq), 1
                p = len(pairs[i][0])
                rows += [r] * len(pairs[i][1])
                cols += range(p - 1, p - 1 + len(pairs[i][1]))
                targets += pairs[i][1]
            ids, mask = ids.to(device), mask.to(device)
            hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
            logits = model.lm_head(hidden[rows, cols]).float() / temperature
            token_logp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets, device=device)]
            sums = torch.zeros(len(seqs), device=device).index_add_(0, torch.tensor(rows, device=device), token_logp)
            out[idx] = sums.cpu().numpy()
    return out


def agreement(r_a, level_a, r_b, level_b) -> dict:
    level_a, level_b = np.asarray(level_a), np.asarray(level_b)
    return dict(spearman=float(stats.spearmanr(r_a, r_b).statistic),
                exact_level=float(np.mean(level_a == level_b)),
                within_one_level=float(np.mean(np.abs(level_a - level_b) <= 1)))


def simulated_agreement(probs: np.ndarray, samples: int, lik_levels, rng, draws: int = 200) -> dict:
    """Agreement of the likelihood with the protocol simulated from its own p_j: the ceiling."""
    r_lik = probs.mean(1)
    figures = []
    for _ in range(draws):
        r_sim = rng.binomial(samples, probs).sum(1) / (samples * probs.shape[1])
        figures.append(agreement(r_lik, lik_levels, r_sim, [levels.level(r) for r in r_sim]))
    return {k: float(np.mean([f[k] for f in figures])) for k in figures[0]}


def calibration(probs: np.ndarray, rates: np.ndarray, edges=(0, 0.01, 0.05, 0.2, 0.5, 1.0001)) -> list[dict]:
    p, h = probs.ravel(), rates.ravel()
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (p >= lo) & (p < hi)
        if sel.any():
            out.append(dict(bin=[lo, min(hi, 1.0)], cells=int(sel.sum()), mean_p=float(p[sel].mean()),
                            hit_rate=float(h[sel].mean())))
    return out


def hit_positions(facts, texts, num_templates: int) -> dict:
    """For completions that hit: does the answer start them, follow an article, or come later?"""
    counts = {"start": 0, "after_article": 0, "later": 0}
    later_examples = []
    for c, outputs in enumerate(texts):
        fact = facts[c // num_templates]
        names = [answers_lib.normalize(n) for n in answers_lib.expand(fact["answers"])]
        for text in outputs:
            if not answers_lib.contains_answer(text, fact["answers"]):
                continue
            raw = text.strip().lower()
            words = answers_lib.normalize(text)
            if any(words.startswith(n) for n in names) and not raw.startswith(("the ", "a ", "an ")):
                counts["start"] += 1
            elif any(words.startswith(n) for n in names):
                counts["after_article"] += 1
            else:
                counts["later"] += 1
                if len(later_examples) < 15:
                    later_examples.append(f"{fact['answers'][0]} <- {text.strip()[:80]}")
    return dict(counts=counts, later_examples=later_examples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/scoring.json")
    parser.add_argument("--facts-per-relation", type=int, default=50)
    parser.add_argument("--torch-facts", type=int, default=30)
    parser.add_argument("--full-facts", type=int, default=8)
    parser.add_argument("--agree-samples", type=int, default=1)
    parser.add_argument("--agree-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--buckets", default="10,14,20,32")
    parser.add_argument("--sample-batch-size", type=int, default=64, help="prompts per sampling batch (agreement)")
    parser.add_argument("--full-batch-size", type=int, default=21, help="prompts per batch of the full protocol")
    parser.add_argument("--stages", default="likelihood,torch,sample,agree,full")
    parser.add_argument("--likelihood-npy", default="", help="p_j of an earlier likelihood stage")
    parser.add_argument("--sampling-npy", default="", help="hit shares of an earlier sample stage")
    parser.add_argument("--outputs-json", default="", help="completions of an earlier sample stage")
    args = parser.parse_args()
    stages = args.stages.split(",")
    out = pathlib.Path(args.out)
    results: dict = dict(args=vars(args), device=str(jax.devices()[0]), cpu_count=os.cpu_count())

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")

    cfg = config_lib.default_config().scoring
    buckets = tuple(int(b) for b in args.buckets.split(","))
    path = sources.locate(config_lib.EMBEDDED_MODEL).weights
    t0 = time.perf_counter()
    model = models.from_pretrained(path)
    tokenizer = tokenization.load_tokenizer(path)
    results["load_s"] = time.perf_counter() - t0
    facts = list(entity_questions.load(splits="train", relations=ID_RELATIONS,
                                       limit_per_relation=args.facts_per_relation))
    templates = templates_lib.completion_templates()
    results["facts"] = len(facts)
    lik = dict(temperature=cfg.temperature, batch_size=args.batch_size, buckets=buckets)
    print(f"{len(facts)} facts, model loaded in {results['load_s']:.0f}s", flush=True)

    probs = np.load(args.likelihood_npy) if args.likelihood_npy else None
    if "likelihood" in stages:
        counter = CompileCounter("_pass")  # prompt_pass and continuation_pass
        t0 = time.perf_counter()
        probs = likelihood.template_probabilities(model, tokenizer, facts, **lik)
        wall = time.perf_counter() - t0
        results["likelihood"] = dict(wall_s=wall, s_per_fact=wall / len(facts), compilations=counter.count,
                                     level_histogram=np.bincount([levels.expected_level(p, cfg.num_samples)
                                                                  for p in probs], minlength=5).tolist())
        np.save(out.with_suffix(".likelihood.npy"), probs)
        save()
        print("likelihood", results["likelihood"], flush=True)

    if "torch" in stages:
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        sub = facts[:args.torch_facts]
        _, pairs = likelihood.fact_pairs(tokenizer, sub, templates)
        t0 = time.perf_counter()
        ours = likelihood.continuation_logprobs(model, pairs, **lik)  # compiled in stage 1
        ours_s = time.perf_counter() - t0
        hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                               torch_dtype=torch.float32).eval()
        t0 = time.perf_counter()
        theirs = torch_logprobs(hf, pairs, cfg.temperature, 2 * args.batch_size)
        torch_s = time.perf_counter() - t0
        results["torch"] = dict(pairs=len(pairs), ours_s=ours_s, torch_s=torch_s, speedup=torch_s / ours_s,
                                max_abs_logp_diff=float(np.max(np.abs(ours - theirs))))
        save()
        print("torch", results["torch"], flush=True)
        del hf

    sample = dict(temperature=cfg.temperature, batch_size=args.sample_batch_size, buckets=buckets, seed=cfg.seed)
    if "sample" in stages:
        texts: list = []
        t0 = time.perf_counter()
        rates = sampling.template_hit_rates(model, tokenizer, facts, num_samples=args.agree_samples,
                                            max_new_tokens=args.agree_tokens, outputs=texts, **sample)
        results["sampling"] = dict(facts=len(facts), samples_per_template=args.agree_samples,
                                   max_new_tokens=args.agree_tokens, wall_s=time.perf_counter() - t0)
        np.save(out.with_suffix(".sampling.npy"), rates)
        out.with_suffix(".outputs.json").write_text(json.dumps(texts))
        save()
        print("sampling", results["sampling"], flush=True)
    if "agree" in stages:
        rates = np.load(args.sampling_npy or out.with_suffix(".sampling.npy"))
        texts = json.loads(pathlib.Path(args.outputs_json or out.with_suffix(".outputs.json")).read_text())
        r_lik, r_s = probs.mean(1), rates.mean(1)
        lik_levels = [levels.expected_level(p, args.agree_samples) for p in probs]
        rng = np.random.default_rng(0)
        results["agreement"] = dict(
            facts=len(facts), samples_per_template=args.agree_samples, max_new_tokens=args.agree_tokens,
            measured=agreement(r_lik, lik_levels, r_s, [levels.level(r) for r in r_s]),
            perfect_estimator=simulated_agreement(probs, args.agree_samples, lik_levels, rng),
            level_histogram_sampling=np.bincount([levels.level(r) for r in r_s], minlength=5).tolist(),
            level_histogram_likelihood=np.bincount(lik_levels, minlength=5).tolist(),
            mean_R=dict(likelihood=float(r_lik.mean()), sampling=float(r_s.mean())),
            calibration=calibration(probs, rates), hits=hit_positions(facts, texts, probs.shape[1]))
        save()
        print("agreement", json.dumps(results["agreement"], indent=1), flush=True)
    if "full" in stages:
        sub = facts[:args.full_facts]
        t0 = time.perf_counter()
        rates = sampling.template_hit_rates(model, tokenizer, sub, num_samples=cfg.num_samples,
                                            max_new_tokens=cfg.max_new_tokens,
                                            **dict(sample, batch_size=args.full_batch_size))
        wall = time.perf_counter() - t0
        r_s = rates.mean(1)
        results["full_protocol"] = dict(facts=len(sub), sampling_s_per_fact=wall / len(sub), R_sampling=r_s.tolist(),
                                        levels_sampling=[levels.level(r) for r in r_s])
        if probs is not None:
            results["full_protocol"].update(
                R_likelihood=probs[:len(sub)].mean(1).tolist(),
                levels_likelihood=[levels.expected_level(p, cfg.num_samples) for p in probs[:len(sub)]])
        if "likelihood" in results:
            results["full_protocol"]["speed_ratio"] = wall / len(sub) / results["likelihood"]["s_per_fact"]
        save()
        print("full", results["full_protocol"], flush=True)


if __name__ == "__main__":
    main()
