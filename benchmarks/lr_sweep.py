"""Learning rate for the demo's model (SmolLM2-135M), chosen on training facts only.

1. Score N in-domain training facts (`--per-relation` per ID relation, the first rows of the train
   split) with the likelihood scorer (`jaxsft.score.run` into a scratch workdir), and, for the
   level shares only, the first `--ood-per-relation` training facts of each OOD relation. No test
   fact is ever read.
2. Per seed, the library's selection of `--size` level-0 facts (`jaxsft.select.select`, balanced over
   the ID relations). The seed's held-out set is every other scored ID fact: within a seed, every
   learning rate is scored on the same questions.
3. Per learning rate and seed: fine-tune with the demo's config (`configs/demo.py`: 1 epoch, batch 8,
   cosine, the paper's prompt; only `train.learning_rate` changes) through `jaxsft.training.train`,
   then answer the held-out questions greedily (`jaxsft.evaluate.evaluate`): accuracy per level.
   The model before fine-tuning is evaluated on the same questions (`baseline`).

The choice (`chosen`): the learning rate with the highest held-out accuracy (all held-out items,
mean over seeds); among the rates whose mean lies within the noise of it (best - mean <= spread_best
+ spread_rate, spread = the larger of the std over seeds and the binomial standard error of the
accuracy over all its held-out answers), the smallest (nearest the paper's 1e-5). Figures go to
`results/lr_sweep.json`, with the wall times per stage (on a shared machine, an upper bound).

    PYTHONPATH=. python benchmarks/lr_sweep.py --workdir /tmp/lr-sweep   # ~10 min on 2 idle cores; resumes
    PYTHONPATH=. python benchmarks/lr_sweep.py --lrs 1e-4 --seeds 0 --per-relation 3 --ood-per-relation 1 \
        --size 8 --out /tmp/s.json                                       # smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import importlib.util
import pathlib
import shutil
import tempfile
import time

import numpy as np

import common

REPO = pathlib.Path(__file__).resolve().parent.parent
LEVELS = (0, 1, 2, 3, 4)


def demo_config():
    spec = importlib.util.spec_from_file_location("demo_config", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def level_shares(levels: list[int]) -> dict[str, dict[str, float]]:
    """Facts per level and their share of all."""
    counts = np.bincount(np.asarray(levels, int), minlength=len(LEVELS))
    return dict(count={str(lv): int(counts[lv]) for lv in LEVELS},
                share={str(lv): float(counts[lv] / max(1, len(levels))) for lv in LEVELS})


def summary(metrics: dict) -> dict:
    """Held-out accuracy: per level (ID role), the counts, and over all held-out items."""
    return dict(accuracy={lv: a for lv, a in metrics["accuracy"]["id"].items() if a is not None},
                count={lv: n for lv, n in metrics["count"]["id"].items() if n},
                overall=metrics["correct"] / max(1, metrics["items"]), seconds=metrics["seconds"])


def choose(runs: dict[str, list[dict]]) -> tuple[str, dict[str, dict]]:
    """The chosen rate (see the module docstring) and each rate's mean / std of `overall`."""
    stats = {}
    for lr, rs in runs.items():
        overall = [r["overall"] for r in rs]
        mean, answers = float(np.mean(overall)), sum(sum(r["count"].values()) for r in rs)
        stats[lr] = dict(mean=mean, std=float(np.std(overall)), se=float(np.sqrt(mean * (1 - mean) / answers)))
        stats[lr]["spread"] = max(stats[lr]["std"], stats[lr]["se"])
    best = max(stats, key=lambda lr: stats[lr]["mean"])
    close = [lr for lr in stats
             if stats[best]["mean"] - stats[lr]["mean"] <= stats[best]["spread"] + stats[lr]["spread"]]
    return min(close, key=float), stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--size", type=int, default=60, help="level-0 training facts per run")
    parser.add_argument("--per-relation", type=int, default=20, help="ID training facts scored per relation")
    parser.add_argument("--ood-per-relation", type=int, default=8, help="OOD training facts scored (level shares only)")
    parser.add_argument("--workdir", default="", help="scratch workdir (kept; scores resume); default: a temp dir")
    parser.add_argument("--out", default=str(common.RESULTS / "lr_sweep.json"))
    args = parser.parse_args()

    from jaxsft import evaluate, run, runtime, score, select, training
    from jaxsft.workdir import Workdir

    lrs = args.lrs.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    scratch = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="lr-sweep-"))
    cfg = demo_config()
    records = Workdir(scratch / "records")  # one JSON per finished stage or evaluation: a rerun skips it
    timings: dict[str, float] = records.read_json("timings.json") if records.exists("timings.json") else {}

    def scored_facts(name: str, relations: str, per_relation: int):
        stage_cfg = run.stage_config(cfg, scoring=dict(split="train"),
                                     data=dict(relations=relations, limit_per_relation=per_relation))
        done, start = score.memorization_done(scratch / name, "train"), time.perf_counter()
        score.run(stage_cfg, scratch / name)  # refuses finished scores of another config
        if not done:
            timings[f"score {name.upper()} facts ({per_relation} per relation)"] = time.perf_counter() - start
            records.write_json("timings.json", timings)
        return select.load_scored(scratch / name, "train")

    scored = scored_facts("id", "id", args.per_relation)
    shares = dict(id=level_shares(list(scored["level"])))
    if args.ood_per_relation:
        shares["ood"] = level_shares(list(scored_facts("ood", "ood", args.ood_per_relation)["level"]))
    print("level shares", shares, flush=True)

    tokenizer = runtime.load_tokenizer(cfg)
    baseline: dict[int, dict] = {}
    runs: dict[str, list[dict]] = {}
    for seed in seeds:
        train_set = select.select(scored, "0", args.size, seed)
        chosen_ids = set(train_set["id"])
        held_out = [dict(row, role="ID") for row in scored.to_list() if row["id"] not in chosen_ids]
        print(f"seed {seed}: {len(scored)} scored, {len(train_set)} trained on, {len(held_out)} held out", flush=True)
        name = f"baseline-seed{seed}.json"
        if not records.exists(name):
            start = time.perf_counter()
            model, _ = runtime.load(cfg, runtime.make_mesh(cfg))
            _, metrics = evaluate.evaluate(model, tokenizer, held_out, cfg, progress=False)
            del model
            records.write_json(name, dict(summary(metrics), load_and_eval_seconds=time.perf_counter() - start))
        baseline[seed] = records.read_json(name)
        print(f"baseline seed {seed}: {baseline[seed]}", flush=True)
        for lr in lrs:
            name = f"lr{lr}-seed{seed}.json"
            if not records.exists(name):
                cell = run.stage_config(cfg, train=dict(learning_rate=float(lr)),
                                        select=dict(level="0", size=str(args.size), seed=seed))
                run_dir = scratch / "sft" / f"lr{lr}-seed{seed}"
                shutil.rmtree(run_dir, ignore_errors=True)  # a run killed half-way starts over
                start = time.perf_counter()
                result = training.train(cell, Workdir(run_dir), train_set)
                train_seconds = time.perf_counter() - start
                start = time.perf_counter()
                _, metrics = evaluate.evaluate(result.model, tokenizer, held_out, cell, progress=False)
                eval_seconds = time.perf_counter() - start
                losses = [h["loss"] for h in result.history]
                records.write_json(name, dict(
                    seed=seed, steps=result.total_steps, first_loss=losses[0], final_loss=losses[-1],
                    train_seconds=train_seconds, eval_seconds=eval_seconds,
                    step_seconds=float(np.median([h["step_seconds"] for h in result.history])), **summary(metrics)))
                del result
                shutil.rmtree(run_dir)  # checkpoint and export: ~2 GB, not needed
            runs.setdefault(lr, []).append(records.read_json(name))
            print(f"lr {lr} seed {seed}: {runs[lr][-1]}", flush=True)

    chosen, stats = choose(runs)
    print(f"chosen lr {chosen}: " + ", ".join(f"{lr}: {100 * s['mean']:.1f} ± {100 * s['std']:.1f}"
                                               for lr, s in stats.items()), flush=True)
    common.write_json(dict(
        name="lr_sweep", machine=common.machine(), load_after=common.load(), model=cfg.model.path,
        protocol=dict(size=args.size, level="0", seeds=seeds, per_relation=args.per_relation,
                      ood_per_relation=args.ood_per_relation, scored=len(scored),
                      epochs=cfg.train.epochs, batch_size=cfg.train.batch_size, schedule=cfg.train.schedule,
                      prompt=cfg.prompt.to_dict(), scoring=cfg.scoring.method),
        level_shares=shares, baseline=baseline, runs=runs, stats=stats, chosen=chosen, timings=timings), args.out)


if __name__ == "__main__":
    main()
