"""A fine-tuned model that other tools open as is: weights, tokenizer, generation config, model card.

`save` writes a local directory that `AutoTokenizer.from_pretrained(dir)` and
`AutoModelForCausalLM.from_pretrained(dir)` load alone, and whose `generate` stops where our
evaluation stops (the same EOS ids); `README.md` is a model card naming the base model, the
training set and the hyperparameters. Once the cell is evaluated, `finish` re-writes the card with
the ID/OOD accuracies and, when `cfg.export.hub_repo` is set, uploads the directory to the hub.

    python -m jaxsft.export --config=configs/demo.py --workdir=runs/demo

does `finish` for every evaluated cell of the grid (to upload after the fact, or re-write cards).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import transformers

from jaxsft import config as config_lib
from jaxsft import models, runtime, select, tokenization
from jaxsft.models import ModelConfig
from jaxsft.workdir import EVAL, MODEL, Workdir

CARD = "README.md"
# Where the embedded model's GGUF comes from: the card's `base_model`.
EMBEDDED_SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def generation_config(model_cfg: ModelConfig, tokenizer) -> transformers.GenerationConfig:
    """Greedy decoding that ends where `evaluate.predict` ends: the tokenizer's EOS and every EOS id of
    the model's config; BOS as the tokenizer adds it (else the config's), PAD the tokenizer's or EOS."""
    bos, eos = tokenization.special_tokens(tokenizer)
    eos_ids = sorted({eos, *model_cfg.eos_ids})
    pad = next((p for p in (tokenizer.pad_token_id, model_cfg.pad_token_id) if p is not None), eos)
    return transformers.GenerationConfig(
        bos_token_id=bos if bos is not None else model_cfg.bos_token_id,
        eos_token_id=eos_ids if len(eos_ids) > 1 else eos_ids[0], pad_token_id=pad, do_sample=False)


def training_set_info(cfg: ml_collections.ConfigDict, train_set) -> dict[str, Any]:
    """The training set as the card describes it: `select.manifest` when the rows carry ids and levels,
    else the recipe and the count."""
    s = cfg.select
    if train_set is not None and {"id", "relation", "level"} <= set(train_set.column_names):
        return select.manifest(train_set, s.level, s.size, s.seed)
    return dict(level=str(s.level), size=str(s.size), seed=int(s.seed),
                count=len(train_set) if train_set is not None else None)


def _base_model(path: str) -> str | None:
    if path == config_lib.EMBEDDED_MODEL:
        return EMBEDDED_SOURCE
    return path if _HUB_ID.fullmatch(path) and not pathlib.Path(path).exists() else None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def model_card(cfg: ml_collections.ConfigDict, training: Mapping[str, Any],
               metrics: Mapping[str, Any] | None = None, name: str = "") -> str:
    """`README.md`: hub metadata, base model, training set, hyperparameters, prompt format, and the
    accuracies per test memorization level once `metrics` (from `evaluate.run`) exist."""
    base = _base_model(cfg.model.path)
    front = ["---", "library_name: transformers", "pipeline_tag: text-generation",
             "tags: [jaxsft, question-answering, entity-questions]"]
    if base:
        front.append(f"base_model: {base}")
    front.append("---")
    count = training.get("count")
    rows = [("memorization level", training.get("level")), ("size requested", training.get("size")),
            ("items", count), ("seed", training.get("seed")),
            ("ids sha256", f"`{training['ids_sha256']}`" if training.get("ids_sha256") else "–")]
    hyper = "\n".join(f"| {k} | {v} |" for k, v in cfg.train.to_dict().items())
    p = cfg.prompt
    if metrics:
        lines = ["| | " + " | ".join(f"L{lv}" for lv in range(5)) + " | macro |", "|---" * 7 + "|"]
        for role in ("id", "ood"):
            acc = metrics["accuracy"].get(role, {})
            lines.append(f"| {role.upper()} | " + " | ".join(_percent(acc.get(str(lv))) for lv in range(5))
                         + f" | {_percent(metrics['macro'].get(role))} |")
        accuracy = (f"Greedy answers to the `{metrics.get('split', cfg.eval.split)}` questions "
                    f"({metrics.get('items')} items), by the base model's memorization level of the fact "
                    "(0: never recalled, 4: recalled in over 3/4 of the probes); correct: the answer contains "
                    "the gold answer or an alias. ID: the training relations, OOD: the others.\n\n" + "\n".join(lines))
    else:
        accuracy = "Not evaluated yet."
    return f"""{chr(10).join(front)}

# {name or 'jaxsft fine-tune'}

`{cfg.model.path}`{f' ([{base}](https://huggingface.co/{base}))' if base and base != cfg.model.path else ''}
fully fine-tuned with jaxsft (JAX/Flax NNX) on {count if count is not None else 'some'} EntityQuestions
facts, following "60 Data Points are Sufficient to Fine-Tune LLMs for Question-Answering".

## Training set

| field | value |
|---|---|
{chr(10).join(f'| {k} | {v} |' for k, v in rows)}

## Hyperparameters (`cfg.train`)

| field | value |
|---|---|
{hyper}

## Prompt

The model was trained to answer `{p.question_prefix}<question>{p.answer_prefix}` with ` <answer> `
followed by EOS; the evaluation decodes greedily and keeps the answer up to its first newline:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "."  # this directory, or the hub repo id
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
ids = tok({json.dumps(p.question_prefix + "Where was Ada Lovelace born?" + p.answer_prefix)}, return_tensors="pt")
new = model.generate(**ids, max_new_tokens={cfg.eval.max_new_tokens})[0, ids.input_ids.shape[1]:]
print(tok.decode(new, skip_special_tokens=True).split("\\n")[0].strip())
```

## Accuracy

{accuracy}
"""


def save(cfg: ml_collections.ConfigDict, model: models.Decoder, out_dir: str | os.PathLike, *, train_set=None,
         tokenizer=None, name: str = "") -> pathlib.Path:
    """Write the model, its tokenizer, `generation_config.json` and the card into the local `out_dir`.

    Every process calls this (gathering the weights is a collective); process 0 writes.
    `Workdir.publish` makes the directory appear whole, local or `gs://`.
    """
    out_dir = pathlib.Path(out_dir)
    models.save_pretrained(model, out_dir)
    if jax.process_index() != 0:
        return out_dir
    tokenizer = tokenizer if tokenizer is not None else runtime.load_tokenizer(cfg)
    tokenizer.save_pretrained(out_dir)
    generation_config(model.cfg, tokenizer).save_pretrained(out_dir)
    (out_dir / CARD).write_text(model_card(cfg, training_set_info(cfg, train_set), name=name or out_dir.parent.name))
    return out_dir


def hub_target(cfg: ml_collections.ConfigDict, name: str) -> tuple[str, str | None]:
    """(repo id, folder in it) for the cell `name`: `{cell}` in `export.hub_repo` names a repo per cell,
    else the cells are folders of one repo."""
    repo = cfg.export.hub_repo
    return (repo.format(cell=name), None) if "{cell}" in repo else (repo, name)


def upload(cfg: ml_collections.ConfigDict, model_dir: Workdir, name: str) -> str | None:
    """Upload `model_dir` to the hub as `hub_target` says; None when `export.hub_repo` is empty."""
    if not cfg.export.hub_repo:
        return None
    import huggingface_hub

    repo, folder = hub_target(cfg, name)
    huggingface_hub.create_repo(repo, private=True, exist_ok=True)  # a new repo is private; an old one keeps its setting
    with model_dir.local_copy() as local:
        huggingface_hub.upload_folder(repo_id=repo, folder_path=os.fspath(local), path_in_repo=folder,
                                      commit_message=f"jaxsft: {name}")
    logging.info("uploaded %s to %s%s", model_dir, repo, f"/{folder}" if folder else "")
    return repo


def finish(cfg: ml_collections.ConfigDict, model_dir: str | os.PathLike | Workdir, manifest: Mapping[str, Any],
           metrics: Mapping[str, Any], *, strict: bool = False) -> None:
    """After evaluation: re-write the card of `model_dir` with `metrics` and the training set's
    `manifest`, then upload when `cfg.export.hub_repo` is set.

    A failed upload is logged, not raised, unless `strict`: an experiment goes on to its next cell,
    and `python -m jaxsft.export` (strict) uploads later."""
    if jax.process_index() != 0:
        return
    model_dir = Workdir(model_dir)
    name = model_dir.root.parent.name
    model_dir.write_text(CARD, model_card(cfg, manifest, metrics, name=name))
    try:
        upload(cfg, model_dir, name)
    except Exception as err:  # the hub raises many types: network, auth, quota
        if strict:
            raise
        logging.error("uploading %s to %s failed (%s: %s); upload later with `python -m jaxsft.export`",
                      model_dir, cfg.export.hub_repo, type(err).__name__, err)


def finish_all(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir) -> list[Workdir]:
    """`finish` every trained and evaluated cell of the experiment in `workdir`; their model dirs."""
    from jaxsft import run, train

    workdir = Workdir(workdir)
    done = []
    for cell in run.grid(cfg):
        run_dir = train.run_dir(cell, workdir)
        if not run_dir.exists(MODEL, "config.json") or not run_dir.exists(EVAL, "metrics.json"):
            logging.warning("%s: not trained and evaluated yet, skipped", run_dir)
            continue
        finish(cell, run_dir.sub(MODEL), workdir.train_set(run_dir.root.name).read_json(select.MANIFEST),
               run_dir.sub(EVAL).read_json("metrics.json"), strict=True)
        done.append(run_dir.sub(MODEL))
    return done


def main(argv: list[str] | None = None) -> int | None:
    """The CLI (`jaxsft.cli`): `finish` every evaluated cell; prints their model directories."""
    from jaxsft import cli

    def _main(a: cli.Invocation) -> None:
        for model_dir in finish_all(a.config, a.workdir):
            print(os.fspath(model_dir))

    return cli.main(cli.Command(_main, workdir="experiment directory (holds sft/ and train_sets/)"), argv)


if __name__ == "__main__":
    main()
