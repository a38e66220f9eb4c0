"""Agreement of the likelihood scorer with the paper's full sampling protocol, on the real SmolLM2-135M.

Phases (the first two resumable):

1. `--phase protocol`: the protocol itself (21 templates x 10 samples, T = 0.7, at most 32 new
   tokens, stop at EOS / newline; `sampling.template_hit_rates`, our jit sampler) on N in-domain
   training facts: a random sample of N / 10 per in-domain relation (seeded), in a shuffled order so
   that every prefix of the file is itself a random sample. One JSON line per fact (template hit
   shares and every completion) goes to `results/agreement_protocol.jsonl.gz`, a few facts at a time.
2. `--phase enrich`: the second phase of a two-phase (stratified) sample. Random sampling finds
   few facts above level 1 (2 % of them), so `--screen` further random in-domain facts, none of
   the first phase's, are screened by one greedy completion per template (T = 0, the protocol's
   cheapest relative, blind to the estimator under test); the protocol then runs on those whose
   greedy hit share is at least `--screen-share`, at most `--take` of them, into
   `results/agreement_enriched.jsonl.gz` (the screen's shares: `results/agreement_screen.json`).
3. `--phase compare` (the default): the likelihood scorer at each `--beams` setting on the same
   facts, against the protocol, on all of them (the stratified sample) and on the random ones
   alone: Spearman of R (all facts, facts with R > 0), exact and within-one level agreement,
   quadratic weighted Cohen's kappa, the 5 x 5 confusion matrix, mean R of each, a calibration
   table of p_j against the templates' hit shares, the scorer's seconds per fact, and the same
   figures after one scale on p_j fitted on the other half of the facts (`cross_fitted`: what
   calibration would buy). -> `results/agreement.json` (`--merge` keeps the other settings there).
4. `--phase leads`: where the protocol's hits put the answer (words before it) -> `agreement_leads.json`.
5. `--phase table`: the markdown table of `agreement.json`.

    python benchmarks/agreement.py --phase protocol --facts 240   # hours on 2 CPU cores; resumes
    python benchmarks/agreement.py --phase enrich --screen 800 --take 60   # resumes
    python benchmarks/agreement.py --beams 0x0,2x1,4x3            # minutes to an hour
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import gzip
import json
import pathlib
import random
import time

import numpy as np

import common

PROTOCOL = common.RESULTS / "agreement_protocol.jsonl.gz"
ENRICHED = common.RESULTS / "agreement_enriched.jsonl.gz"
SCREEN = common.RESULTS / "agreement_screen.json"
FACTS_PER_CALL = 3  # 63 prompts x 10 samples per sampler call


def sample_facts(n: int, seed: int = 0) -> list[dict]:
    """n / 10 random in-domain training facts per relation, shuffled (seeded)."""
    from jaxsft.data import entity_questions
    from jaxsft.data.relations import ID_RELATIONS

    rng = random.Random(seed)
    by_relation: dict[str, list[dict]] = {}
    for fact in entity_questions.load(splits="train", relations=ID_RELATIONS):
        by_relation.setdefault(fact["relation"], []).append(fact)
    per_relation = -(-n // len(ID_RELATIONS))
    facts = [f for r in ID_RELATIONS for f in rng.sample(by_relation[r], per_relation)]
    rng.shuffle(facts)
    return facts[:n]


def read_protocol(path: pathlib.Path = PROTOCOL) -> list[dict]:
    if not path.exists():
        return []
    with gzip.open(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_protocol(args, cfg, model, tokenizer) -> None:
    protocol(sample_facts(args.facts, args.seed), PROTOCOL, cfg, model, tokenizer)


def protocol(facts: list[dict], path: pathlib.Path, cfg, model, tokenizer) -> None:
    """The protocol on `facts`, appended to `path` a few facts at a time; facts already there are skipped."""
    from jaxsft.scoring import sampling

    done = {row["id"] for row in read_protocol(path)}
    todo = [f for f in facts if f["id"] not in done]
    print(f"protocol: {len(done)} facts done, {len(todo)} to go", flush=True)
    for start in range(0, len(todo), FACTS_PER_CALL):
        facts = todo[start:start + FACTS_PER_CALL]
        outputs: list = []
        begin = time.perf_counter()
        rates = sampling.template_hit_rates(
            model, tokenizer, facts, temperature=cfg.temperature, num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens, batch_size=21 * FACTS_PER_CALL, buckets=tuple(cfg.buckets),
            seed=cfg.seed, outputs=outputs)
        seconds = (time.perf_counter() - begin) / len(facts)
        lines = []
        for f, fact in enumerate(facts):
            n = len(rates[f])
            lines.append(json.dumps(dict(id=fact["id"], relation=fact["relation"], subject=fact["subject"],
                                         answers=fact["answers"], rates=rates[f].tolist(),
                                         outputs=outputs[f * n:(f + 1) * n], seconds=seconds)))
        with gzip.open(path, "at") as out:  # one gzip member per call: a killed run loses one call
            out.write("\n".join(lines) + "\n")
        print(f"protocol: {len(done) + start + len(facts)} facts, {seconds:.1f} s/fact", flush=True)


def run_enrich(args, cfg, model, tokenizer) -> None:
    """Screen further random facts by their greedy completions, then the protocol on those that pass."""
    from jaxsft.data import entity_questions
    from jaxsft.data.relations import ID_RELATIONS
    from jaxsft.scoring import sampling

    first = {f["id"] for f in sample_facts(args.facts, args.seed)}
    pool = [f for f in entity_questions.load(splits="train", relations=ID_RELATIONS) if f["id"] not in first]
    random.Random(args.seed + 1).shuffle(pool)
    screened = pool[:args.screen]
    if SCREEN.exists() and json.loads(SCREEN.read_text())["screen"] == args.screen:
        shares = json.loads(SCREEN.read_text())["greedy_share"]
    else:
        begin = time.perf_counter()
        rates = sampling.template_hit_rates(model, tokenizer, screened, temperature=0.0, num_samples=1,
                                            max_new_tokens=cfg.max_new_tokens, batch_size=4 * cfg.batch_size,
                                            buckets=tuple(cfg.buckets))
        shares = dict(zip([f["id"] for f in screened], rates.mean(1).tolist()))
        common.write_json(dict(screen=args.screen, seed=args.seed + 1, excluded=len(first),
                               seconds_per_fact=(time.perf_counter() - begin) / len(screened),
                               greedy_share=shares), SCREEN)
    passed = [f for f in screened if shares[f["id"]] >= args.screen_share]
    print(f"screen: {len(passed)} of {len(screened)} facts with a greedy hit share >= {args.screen_share}", flush=True)
    protocol(passed[:args.take], ENRICHED, cfg, model, tokenizer)


def lead_words(rows: list[dict]) -> dict:
    """Where the protocol's hits put the answer: the words of the normalised output (articles
    dropped, as matching drops them) before the first alias. The estimator without a beam sees
    only the hits at 0 words; a beam of depth d at most those within about d tokens."""
    from collections import Counter

    from jaxsft.data import answers as answers_lib

    counts: Counter = Counter()
    for row in rows:
        names = {answers_lib.normalize(n) for n in answers_lib.expand(row["answers"])} - {""}
        for samples in row["outputs"]:
            for text in samples:
                padded = f" {answers_lib.normalize(text)} "
                starts = [padded.find(f" {n} ") for n in names if f" {n} " in padded]
                if starts:
                    counts[len(padded[:min(starts) + 1].split())] += 1
    hits = sum(counts.values())
    if not hits:
        return dict(hits=0)
    bins = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 8), (9, 31)]
    return dict(hits=hits, share_by_lead_words=[
        dict(words=f"{low}" if low == high else f"{low}-{high}",
             share=sum(counts[k] for k in range(low, high + 1)) / hits,
             cumulative=sum(counts[k] for k in range(high + 1)) / hits) for low, high in bins])


CALIBRATION_BINS = (0.0, 1e-3, 1e-2, 0.05, 0.1, 0.25, 0.5, 1.0)


def agreement(protocol_rates: np.ndarray, estimate: np.ndarray, samples: int) -> dict:
    """How the estimator's p_j [facts, templates] agree with the protocol's hit shares."""
    from scipy import stats
    from sklearn import metrics

    from jaxsft.scoring import levels

    r_protocol, r_estimate = protocol_rates.mean(1), estimate.mean(1)
    level_protocol = np.array([levels.level(r) for r in r_protocol])
    level_estimate = np.array([levels.expected_level(p, samples) for p in estimate])
    hit = r_protocol > 0
    calibration = []
    for low, high in zip(CALIBRATION_BINS[:-1], CALIBRATION_BINS[1:]):
        inside = (estimate >= low) & ((estimate < high) | (high == 1.0))
        if inside.any():
            calibration.append(dict(p_from=low, p_to=high, templates=int(inside.sum()),
                                    mean_p=float(estimate[inside].mean()),
                                    hit_share=float(protocol_rates[inside].mean())))
    return dict(
        facts=len(r_protocol), facts_with_hits=int(hit.sum()),
        spearman_r=float(stats.spearmanr(r_protocol, r_estimate).statistic),
        spearman_r_hits=float(stats.spearmanr(r_protocol[hit], r_estimate[hit]).statistic) if hit.sum() > 2 else None,
        exact_level=float(np.mean(level_protocol == level_estimate)),
        within_one_level=float(np.mean(np.abs(level_protocol - level_estimate) <= 1)),
        weighted_kappa=float(metrics.cohen_kappa_score(level_protocol, level_estimate, labels=list(range(5)),
                                                       weights="quadratic")),
        confusion=metrics.confusion_matrix(level_protocol, level_estimate, labels=list(range(5))).tolist(),
        mean_r=dict(protocol=float(r_protocol.mean()), estimate=float(r_estimate.mean()),
                    ratio=float(r_estimate.mean() / r_protocol.mean()) if r_protocol.mean() else None),
        levels_protocol=np.bincount(level_protocol, minlength=5).tolist(),
        levels_estimate=np.bincount(level_estimate, minlength=5).tolist(),
        calibration=calibration)


def cross_fitted(protocol_rates: np.ndarray, estimate: np.ndarray, seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """The estimate with one scale c on its p_j (min(1, c p_j)), c fitted on the other half of the
    facts (2 folds, seeded) as mean R of the protocol / mean R of the estimate: what a small protocol
    run on the same model would calibrate. An analysis of what calibration buys, not the library."""
    fold = np.random.default_rng(seed).permutation(len(estimate)) % 2
    scaled, scales = np.empty_like(estimate), []
    for k in (0, 1):
        scales.append(float(protocol_rates[fold != k].mean() / estimate[fold != k].mean()))
        scaled[fold == k] = np.minimum(1.0, scales[-1] * estimate[fold == k])
    return scaled, scales


def compare(args, cfg, model, tokenizer) -> None:
    """The likelihood scorer at each beam setting, against the protocol's facts."""
    from jaxsft.scoring import likelihood

    random_rows, enriched_rows = read_protocol(), read_protocol(ENRICHED)
    if not random_rows:
        raise SystemExit(f"no protocol results in {PROTOCOL}: run --phase protocol first")
    rows = random_rows + enriched_rows
    facts = [dict(id=r["id"], relation=r["relation"], subject=r["subject"], answers=r["answers"]) for r in rows]
    protocol_rates = np.array([r["rates"] for r in rows])
    random_part = slice(0, len(random_rows))
    # seconds per fact of the protocol, measured alone by sampling_vs_generate.py (ours and generate's);
    # the per-call seconds in the protocol file were taken while other jobs ran
    timed = json.loads((common.RESULTS / "sampling_vs_generate.json").read_text())
    protocol_seconds = dict(ours=timed["seconds_per_fact"]["a"], generate=timed["seconds_per_fact"]["b"],
                            void=timed["timing"]["void"])
    results = []
    for setting in args.beams.split(","):
        width, depth = map(int, setting.split("x"))
        options = dict(temperature=cfg.temperature, batch_size=cfg.batch_size, buckets=tuple(cfg.buckets),
                       prune_epsilon=cfg.prune_epsilon, beam_width=width, beam_depth=depth,
                       layout="cached" if depth else "packed")
        likelihood.template_probabilities(model, tokenizer, facts[:3], **options)  # compile
        work: dict = {}
        begin = time.perf_counter()
        estimate = likelihood.template_probabilities(model, tokenizer, facts, **options, stats=work)
        seconds = (time.perf_counter() - begin) / len(facts)
        result = dict(beam_width=width, beam_depth=depth, layout=options["layout"], seconds_per_fact=seconds,
                      load=common.load(),
                      protocol_over_estimate=protocol_seconds["ours"] / seconds,
                      generate_over_estimate=protocol_seconds["generate"] / seconds, work=work,
                      **agreement(protocol_rates, estimate, cfg.num_samples),
                      random_sample=agreement(protocol_rates[random_part], estimate[random_part], cfg.num_samples),
                      r_estimate=estimate.mean(1).tolist())
        scaled, scales = cross_fitted(protocol_rates, estimate)
        result["cross_fitted"] = dict(scales=scales, **agreement(protocol_rates, scaled, cfg.num_samples),
                                      random_sample=agreement(protocol_rates[random_part], scaled[random_part],
                                                              cfg.num_samples))
        shown = {k: v for k, v in result.items()
                 if k not in ("calibration", "work", "random_sample", "r_estimate", "cross_fitted")}
        print(json.dumps(shown), flush=True)
        results.append(result)
        # after each setting: a long run keeps what it did
        write(args, cfg, random_rows, enriched_rows, protocol_rates, protocol_seconds, results)


def write(args, cfg, random_rows, enriched_rows, protocol_rates, protocol_seconds, results) -> None:
    rows = random_rows + enriched_rows
    path = pathlib.Path(args.out or common.RESULTS / "agreement.json")
    if args.merge and path.exists():  # keep the other settings' results (same facts)
        ran = {(r["beam_width"], r["beam_depth"]) for r in results}
        kept = [e for e in json.loads(path.read_text())["estimators"] if (e["beam_width"], e["beam_depth"]) not in ran]
        results = sorted(kept + results, key=lambda e: e["seconds_per_fact"])
    common.write_json(dict(name="agreement", machine=common.machine(), load=common.load(),
                           protocol=dict(facts=len(rows), random_facts=len(random_rows),
                                         enriched_facts=len(enriched_rows), files=[PROTOCOL.name, ENRICHED.name],
                                         seconds_per_fact=protocol_seconds,
                                         temperature=cfg.temperature, samples=cfg.num_samples,
                                         max_new_tokens=cfg.max_new_tokens, mean_r=float(protocol_rates.mean())),
                           prune_epsilon=cfg.prune_epsilon, estimators=results),
                      path)


def table(path: pathlib.Path) -> str:
    """The markdown table of `results/agreement.json` (WORKSPACE.md shows it): each estimator on the
    stratified sample (random + enriched facts) and on the random facts alone."""
    result = json.loads(path.read_text())
    p = result["protocol"]
    head = ("| beam (width x depth) | facts | s / fact (load / core) | faster than the protocol by `generate` "
            "| exact level | within one | weighted kappa | Spearman R (all) | Spearman R (R > 0) | mean R / protocol's |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for e in result["estimators"]:
        samples = [("", f"all {p['facts']} (stratified)", e), ("", f"random {p['random_facts']}", e["random_sample"])]
        if "cross_fitted" in e:
            c = e["cross_fitted"]
            samples += [(" + scale", f"all {p['facts']} (stratified)", c), (" + scale", f"random {p['random_facts']}",
                                                                              c["random_sample"])]
        for scaled, name, a in samples:
            lines.append(f"| {e['beam_width']} x {e['beam_depth']}{scaled} | {name} | {e['seconds_per_fact']:.2f} "
                         f"({e['load']['per_core']:.2f}) | {e['generate_over_estimate']:.0f}x | {a['exact_level']:.3f} "
                         f"| {a['within_one_level']:.3f} | {a['weighted_kappa']:.3f} | {a['spearman_r']:.3f} "
                         f"| {a['spearman_r_hits']:.3f} | {a['mean_r']['ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("protocol", "enrich", "compare", "table", "leads"), default="compare")
    parser.add_argument("--facts", type=int, default=240)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--beams", default="0x0,4x1,4x2,8x2,8x3", help="beam width x depth settings to compare")
    parser.add_argument("--screen", type=int, default=800, help="enrich: facts screened by greedy completions")
    parser.add_argument("--screen-share", type=float, default=0.25, help="enrich: greedy hit share to pass")
    parser.add_argument("--take", type=int, default=60, help="enrich: at most this many passed facts")
    parser.add_argument("--merge", action="store_true", help="compare: keep the other beams' results in --out")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.phase == "table":
        print(table(pathlib.Path(args.out) if args.out else common.RESULTS / "agreement.json"))
        return
    if args.phase == "leads":
        leads = dict(random=lead_words(read_protocol()), enriched=lead_words(read_protocol(ENRICHED)))
        common.write_json(leads, args.out or common.RESULTS / "agreement_leads.json")
        print(json.dumps(leads, indent=1))
        return
    from jaxsft import config as config_lib
    from jaxsft import models, tokenization

    cfg = config_lib.default_config().scoring
    path = common.smollm2_gguf()
    model, tokenizer = models.from_pretrained(path, scan_layers=True), tokenization.load_tokenizer(path)
    if args.phase == "protocol":
        run_protocol(args, cfg, model, tokenizer)
    elif args.phase == "enrich":
        run_enrich(args, cfg, model, tokenizer)
    else:
        compare(args, cfg, model, tokenizer)


if __name__ == "__main__":
    main()
