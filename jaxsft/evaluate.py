"""QA evaluation: greedy answers to the test questions, accuracy per memorization level, ID and OOD.

`python -m jaxsft.evaluate --config=configs/demo.py --workdir=runs/demo/sft/0-60-0` answers the test
facts scored in `memorization/` (found in the workdir or the nearest directory above it) with the
run's fine-tuned model (`<workdir>/model`, else `cfg.model.path`) and writes
`<workdir>/eval/predictions.jsonl` and `<workdir>/eval/metrics.json`.

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
import pyarrow as pa
import pyarrow.parquet as pq
import tqdm
from etils import epath

from jaxsft import batching, generate, runtime, tokenization, tracking
from jaxsft.data import answers, relations
from jaxsft.models import Decoder

LEVELS = (0, 1, 2, 3, 4)
ROLES = {relations.ID: "id", relations.OOD: "ood"}  # relation role -> key in the metrics
COLUMNS = ("id", "split", "relation", "question", "answers", "level")


def load_test_items(directory: str | os.PathLike, split: str = "test", limit_per_level: int = 0) -> list[dict]:
    """The scored facts of `split` in `directory/*.parquet` (file-name order), with their relation's role;
    `limit_per_level` keeps the first items of each (role, level)."""
    files = sorted(epath.Path(directory).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no scored facts (*.parquet) in {directory}: run `python -m jaxsft.score` first")
    table = pa.concat_tables([pq.read_table(os.fspath(f), columns=list(COLUMNS)) for f in files])
    items = [row for row in table.to_pylist() if row["split"] == split]
    if not items:
        raise ValueError(f"no {split!r} facts among the {table.num_rows} scored in {directory}")
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


def scores_dir(workdir: str | os.PathLike) -> epath.Path:
    """`memorization/` in `workdir` or the nearest directory above it (a run lives in `<exp>/sft/<set>`)."""
    workdir = epath.Path(workdir).resolve()
    for directory in (workdir, *workdir.parents):
        if (directory / "memorization").is_dir():
            return directory / "memorization"
    raise FileNotFoundError(f"no memorization/ in {workdir} or above: run `python -m jaxsft.score` first")


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, *, scores_workdir: str | os.PathLike | None = None,
        model: Decoder | None = None, tokenizer=None) -> dict[str, Any]:
    """Evaluate `model` (default: `<workdir>/model` if present, else `cfg.model.path`) on the scored test
    facts; write `<workdir>/eval/predictions.jsonl` and `metrics.json`; return the metrics."""
    workdir = epath.Path(workdir)
    source = epath.Path(scores_workdir) / "memorization" if scores_workdir else scores_dir(workdir)
    items = load_test_items(source, cfg.eval.split, cfg.eval.limit_per_level)
    model_path = None  # a model passed in is recorded as such
    if model is None:
        model_path = os.fspath(workdir / "model") if (workdir / "model").exists() else cfg.model.path
        logging.info("evaluating %s on %d %s facts from %s", model_path, len(items), cfg.eval.split, source)
        model = runtime.load_model(cfg, runtime.make_mesh(cfg), model_path)
    predictions, result = evaluate(model, tokenizer or runtime.load_tokenizer(cfg), items, cfg)
    result.update(model=model_path, scores=os.fspath(source), split=cfg.eval.split)
    if jax.process_index() == 0:
        out = workdir / "eval"
        runtime.atomic_write_text(out / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions))
        runtime.atomic_write_json(out / "metrics.json", result)
    tracking.log_evaluation(cfg, workdir, result, predictions)  # TensorBoard (and W&B) on process 0
    logging.info("accuracy (macro over levels): ID %s, OOD %s", result["macro"]["id"], result["macro"]["ood"])
    return result


def main() -> None:
    """The CLI; its flags are defined here, so importing this module defines none."""
    from absl import app, flags
    from ml_collections import config_flags

    from jaxsft import config as config_lib, hardware

    config = config_flags.DEFINE_config_file("config", None, "experiment config file (default: default_config())",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "run directory: holds model/, receives eval/")
    scores = flags.DEFINE_string("scores_workdir", None, "directory holding memorization/ (default: the "
                                 "workdir or the nearest directory above it that has one)")
    flags.mark_flags_as_required(["workdir"])

    def _main(argv):
        del argv
        hardware.maybe_initialize_distributed()
        run(config.value or config_lib.default_config(), workdir.value, scores_workdir=scores.value)

    app.run(_main)


if __name__ == "__main__":
    main()
