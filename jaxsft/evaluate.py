"""QA evaluation: greedy answers to the test questions, accuracy per memorization level, ID and OOD.

`python -m jaxsft.evaluate --config=configs/demo.py --workdir=runs/demo --config.select.level=0`
answers the scored test facts of the workdir (`score` with `scoring.split=test`) with the fine-tuned
model of the grid cell `cfg.select` (its `model/`, else `cfg.model.path`) and writes the cell's
`eval/predictions.jsonl` and `eval/metrics.json`. `baseline` does the same for the model before
fine-tuning (`baseline/eval/`), the reference every cell is compared with.

An answer is correct when the normalised output contains the normalised answer or one of its
aliases (`jaxsft.data.answers`). Accuracy is reported per test level (0-4) for the in-domain and
out-of-domain relations, with the paper's macro average: the unweighted mean over the levels.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import tqdm

from jaxsft import batching, generate, runtime, tokenization, tracking
from jaxsft import score as score_stage
from jaxsft import workdir as workdir_lib
from jaxsft.data import answers, relations
from jaxsft.errors import UserError
from jaxsft.models import sources
from jaxsft.models import Decoder

LEVELS = (0, 1, 2, 3, 4)
ROLES = {relations.ID: "id", relations.OOD: "ood"}  # relation role -> key in the metrics
COLUMNS = ("id", "split", "relation", "question", "answers", "level")


def load_test_items(workdir: str | os.PathLike | workdir_lib.Workdir, split: str = "test",
                    limit_per_level: int = 0) -> list[dict]:
    """The scored facts of `split` in `workdir` (shard order), with their relation's role;
    `limit_per_level` keeps the first items of each (role, level)."""
    table = score_stage.read_rows(workdir, split, columns=COLUMNS)
    where = score_stage.output_dir(workdir, split).root
    if not table.num_rows:
        raise FileNotFoundError(f"no scored {split} facts in {where}: run `python -m jaxsft.score "
                                f"--config.scoring.split={split}` first")
    items = [row for row in table.to_pylist() if row["split"] == split]
    if not items:
        raise UserError(f"no {split!r} facts among the {table.num_rows} scored in {where}")
    taken: dict[tuple[str, int], int] = {}
    kept = []
    for item in items:
        item["role"] = relations.role(item["relation"])
        key = (item["role"], item["level"])
        taken[key] = taken.get(key, 0) + 1
        if not limit_per_level or taken[key] <= limit_per_level:
            kept.append(item)
    return kept


def prompt_ids(tokenizer, questions: Sequence[str], prompt: ml_collections.ConfigDict) -> list[list[int]]:
    """BOS (if the tokenizer uses one) + the SFT prompt `question_prefix + question + answer_prefix`."""
    template = tokenization.SFTTemplate(question_prefix=prompt.question_prefix, answer_prefix=prompt.answer_prefix)
    bos, _ = tokenization.special_tokens(tokenizer)
    head = [] if bos is None else [bos]
    texts = [template.prompt(q) for q in questions]
    return [head + ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    """The generated answer: decoded without special tokens, up to its first newline."""
    return tokenizer.decode(tokens, skip_special_tokens=True).split("\n", 1)[0].strip()


def predict(model: Decoder, tokenizer, questions: Sequence[str], cfg: ml_collections.ConfigDict,
            progress: bool = True) -> tuple[list[str], int]:
    """Greedy answers (KV cache, length buckets, at most `cfg.eval.max_new_tokens` tokens, ending at
    EOS or a newline) and the number of tokens generated."""
    e = cfg.eval
    prompts = prompt_ids(tokenizer, questions, cfg.prompt)
    _, eos = tokenization.special_tokens(tokenizer)
    stop = generate.stop_token_table(tokenizer, sorted({eos, *model.cfg.eos_ids}))
    outputs: list[str] = [""] * len(prompts)
    generated = 0
    lead = jax.process_index() == 0  # one bar per job
    with tqdm.tqdm(total=len(prompts), desc="evaluate", unit="question", disable=not (progress and lead)) as bar:
        for bucket, idx in batching.bucketed_batches([len(p) for p in prompts], e.buckets, e.batch_size):
            new = generate.generate(model, [prompts[i] for i in idx], stop_table=stop, max_new_tokens=e.max_new_tokens,
                                    buckets=(bucket,), batch_size=e.batch_size)
            for i, (tokens,) in zip(idx, new):
                outputs[i] = answer_text(tokenizer, tokens)
                generated += len(tokens)
            bar.update(len(idx))
    return outputs, generated


def score(items: Sequence[Mapping[str, Any]], predictions: Sequence[str]) -> list[dict]:
    """One record per item: id, relation, role, level, question, answers, prediction, correct."""
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} items but {len(predictions)} predictions")
    return [dict(id=it["id"], relation=it["relation"], role=it.get("role") or relations.role(it["relation"]),
                 level=int(it["level"]), question=it["question"], answers=list(it["answers"]), prediction=p,
                 correct=answers.contains_answer(p, it["answers"]))
            for it, p in zip(items, predictions)]


def metrics(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy per role (`id`, `ood`) and level, their macro average over the levels that have items
    (None where there are none), and the counts."""
    out: dict[str, Any] = {"accuracy": {}, "macro": {}, "count": {}}
    for role, key in ROLES.items():
        hits: dict[int, list[bool]] = {lv: [] for lv in LEVELS}
        for r in records:
            if r["role"] == role:
                hits[int(r["level"])].append(bool(r["correct"]))
        accuracy = {str(lv): sum(h) / len(h) if h else None for lv, h in hits.items()}
        present = [a for a in accuracy.values() if a is not None]
        out["accuracy"][key] = accuracy
        out["macro"][key] = sum(present) / len(present) if present else None
        out["count"][key] = {str(lv): len(h) for lv, h in hits.items()}
    out["items"] = len(records)
    out["correct"] = sum(bool(r["correct"]) for r in records)
    return out


def evaluate(model: Decoder, tokenizer, test_items: Sequence[Mapping[str, Any]], cfg: ml_collections.ConfigDict,
             progress: bool = True) -> tuple[list[dict], dict[str, Any]]:
    """Answer `test_items` (dicts with id, relation, question, answers, level) greedily and score them:
    (one record per item, metrics)."""
    start = time.perf_counter()
    outputs, generated = predict(model, tokenizer, [it["question"] for it in test_items], cfg, progress)
    seconds = time.perf_counter() - start
    predictions = score(test_items, outputs)
    result = metrics(predictions)
    result.update(seconds=seconds, generated_tokens=generated, tokens_per_second=generated / max(seconds, 1e-9))
    return predictions, result


def settings(cfg: ml_collections.ConfigDict, cell: workdir_lib.Workdir) -> dict[str, Any]:
    """What an evaluation's result depends on: the model evaluated (the cell's fine-tuned one, else
    `cfg.model`), the tokenizer's model, the test facts and the decoding settings."""
    fine_tuned = cell.sub(workdir_lib.MODEL)
    model = fine_tuned if fine_tuned.exists("config.json") else cfg.model.path
    return dict(model=sources.fingerprint(os.fspath(model)), tokenizer=sources.fingerprint(cfg.model.path),
                eval=cfg.eval.to_dict(), prompt=cfg.prompt.to_dict())


def baseline_settings(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """What the baseline's result depends on: the base model `cfg.model` and its compute dtype, the
    test facts and the decoding settings."""
    return dict(model=sources.fingerprint(cfg.model.path), tokenizer=sources.fingerprint(cfg.model.path),
                dtype=cfg.model.dtype, eval=cfg.eval.to_dict(), prompt=cfg.prompt.to_dict())


def _finished(out: workdir_lib.Workdir, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """The metrics in `out` if they were computed with the `expected` settings; None if there are none.
    Results of other settings are never overwritten: they are an error naming the difference."""
    if not out.exists("metrics.json"):
        return None
    metrics = out.read_json("metrics.json")
    differ = score_stage.differences(metrics.get("settings", {}), json.loads(json.dumps(expected)))
    if differ:
        raise UserError(f"{out.root} holds an evaluation with other settings ({differ}); it is kept: use another "
                        "workdir, or move that directory away to evaluate again")
    return metrics


def done(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | workdir_lib.Workdir) -> dict[str, Any] | None:
    """The metrics of the cell `cfg.select` if it was evaluated with these settings; None if it was not
    evaluated. Results of other settings are never overwritten: they are an error naming the difference."""
    from jaxsft import train

    cell = train.run_dir(cfg, workdir)
    return _finished(cell.sub(workdir_lib.EVAL), settings(cfg, cell))


def baseline_done(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | workdir_lib.Workdir
                  ) -> dict[str, Any] | None:
    """The baseline's metrics if it was evaluated with these settings, as `done` for a cell."""
    return _finished(workdir_lib.Workdir(workdir).baseline().sub(workdir_lib.EVAL), baseline_settings(cfg))


def _answer(cfg: ml_collections.ConfigDict, workdir: workdir_lib.Workdir, out: workdir_lib.Workdir, model: Decoder,
            tokenizer, items: Sequence[Mapping[str, Any]], recorded: Mapping[str, Any]
            ) -> tuple[list[dict], dict[str, Any]]:
    """Evaluate `model` on `items`, the workdir's scored test facts; write `predictions.jsonl` and
    `metrics.json` (with `recorded`) into `out`."""
    predictions, result = evaluate(model, tokenizer, items, cfg, progress=jax.process_index() == 0)
    result.update(scores=os.fspath(score_stage.output_dir(workdir, cfg.eval.split)), split=cfg.eval.split, **recorded)
    out.write_text("predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
    out.write_json("metrics.json", result)
    logging.info("accuracy (macro over levels) in %s: ID %s, OOD %s", out.root, result["macro"]["id"],
                 result["macro"]["ood"])
    return predictions, result


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | workdir_lib.Workdir, *,
        model: Decoder | None = None, tokenizer=None) -> dict[str, Any]:
    """Evaluate the grid cell `cfg.select` of the experiment `workdir` on its scored test facts: `model`
    (default: the cell's `model/` if there, else `cfg.model.path`; `tokenizer` default: that model's).
    Writes the cell's `eval/predictions.jsonl` and `eval/metrics.json`; returns the metrics."""
    from jaxsft import train

    workdir = workdir_lib.Workdir(workdir)
    cell = train.run_dir(cfg, workdir)
    done(cfg, workdir)  # refuses to overwrite an evaluation of other settings
    items = load_test_items(workdir, cfg.eval.split, cfg.eval.limit_per_level)
    model_path = None  # a model passed in is recorded as such
    if model is None:
        fine_tuned = cell.sub(workdir_lib.MODEL)
        model_path = os.fspath(fine_tuned) if fine_tuned.exists("config.json") else cfg.model.path
        logging.info("evaluating %s on %d %s facts", model_path, len(items), cfg.eval.split)
        model, loaded = runtime.load(cfg, runtime.make_mesh(cfg), model_path)
        tokenizer = tokenizer or loaded
    tokenizer = tokenizer or runtime.load_tokenizer(cfg)
    predictions, result = _answer(cfg, workdir, cell.sub(workdir_lib.EVAL), model, tokenizer, items,
                                  dict(model=model_path, settings=settings(cfg, cell)))
    tracking.log_evaluation(cfg, cell, result, predictions)  # TensorBoard (and W&B) on process 0
    return result


def baseline(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | workdir_lib.Workdir, *,
             model: Decoder | None = None, tokenizer=None) -> dict[str, Any]:
    """The baseline: the model before fine-tuning (`cfg.model`; `model` and `tokenizer` when loaded
    already) answers the test facts every cell answers, scored the same way. Writes the workdir's
    `baseline/eval/predictions.jsonl` and `metrics.json`; returns the metrics. Done already with
    these settings: returns them, nothing is loaded; done with other settings: refused."""
    workdir = workdir_lib.Workdir(workdir)
    metrics = baseline_done(cfg, workdir)
    if metrics is not None:
        return metrics
    items = load_test_items(workdir, cfg.eval.split, cfg.eval.limit_per_level)
    if model is None:
        model, loaded = runtime.load(cfg, runtime.make_mesh(cfg))
        tokenizer = tokenizer or loaded
    tokenizer = tokenizer or runtime.load_tokenizer(cfg)
    _, result = _answer(cfg, workdir, workdir.baseline().sub(workdir_lib.EVAL), model, tokenizer, items,
                        dict(model=cfg.model.path, settings=baseline_settings(cfg)))
    return result


def main(argv: list[str] | None = None) -> int | None:
    """The CLI (`jaxsft.cli`); --config is required: a fine-tuned model is read with its own tokenizer."""
    from jaxsft import cli, hardware

    def _main(a: cli.Invocation) -> None:
        hardware.maybe_initialize_distributed()
        run(a.config, a.workdir)

    return cli.main(cli.Command(_main, workdir="experiment directory (local or gs://): holds the scored test "
                                "facts and sft/<cell>/"), argv)


if __name__ == "__main__":
    main()
