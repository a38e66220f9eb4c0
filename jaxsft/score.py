"""Score the memorization of facts: `<workdir>/memorization/`.

    python -m jaxsft.score --config=configs/demo.py --workdir=runs/demo [--config.scoring.method=sampling]

Writes one parquet shard per `scoring.shard_size` facts (`shard-00000-of-00003.parquet`, one row
per fact: id, split, relation, subject, question, answers, template_scores, R, level), then the
per-relation level histogram (`levels.json`, `levels.png`) and the completion marker `done.json`.
Shards are written atomically; `manifest.json` pins what is scored, so a run started again skips
the shards it has and scores the rest, and a run of a different scoring config is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence

import jax
import ml_collections
import pyarrow as pa
import pyarrow.parquet as pq
from absl import logging
from etils import epath

from jaxsft import config as config_lib
from jaxsft import runtime
from jaxsft.data import entity_questions
from jaxsft.data.relations import ALL_RELATIONS, ID_RELATIONS, OOD_RELATIONS
from jaxsft.scoring import levels, score_facts

OUTPUT_DIR = "memorization"
MANIFEST = "manifest.json"
DONE = "done.json"
HISTOGRAM = "levels"

SCHEMA = pa.schema([
    ("id", pa.string()), ("split", pa.string()), ("relation", pa.string()), ("subject", pa.string()),
    ("question", pa.string()), ("answers", pa.list_(pa.string())), ("template_scores", pa.list_(pa.float64())),
    ("R", pa.float64()), ("level", pa.int64()),
])


def relations(selection: str) -> tuple[str, ...]:
    """`id`, `ood`, `all` or comma-separated relation ids."""
    named = {"id": ID_RELATIONS, "ood": OOD_RELATIONS, "all": ALL_RELATIONS}
    if selection in named:
        return named[selection]
    return tuple(r.strip() for r in selection.split(",") if r.strip())


def load_facts(cfg: ml_collections.ConfigDict):
    """The facts `cfg.data` and `cfg.scoring.split` select, as a `datasets.Dataset`."""
    return entity_questions.load(cfg.data.path or None, splits=cfg.scoring.split,
                                 relations=relations(cfg.data.relations),
                                 limit_per_relation=cfg.data.limit_per_relation or None)


def output_dir(workdir: str | os.PathLike) -> epath.Path:
    return epath.Path(workdir) / OUTPUT_DIR


def memorization_done(workdir: str | os.PathLike) -> bool:
    """Whether `run` finished in `workdir`: every shard, the histogram and the marker are there."""
    return (output_dir(workdir) / DONE).exists()


def _manifest(cfg: ml_collections.ConfigDict, ids: Sequence[str]) -> dict:
    """What the output is: the facts (a fingerprint of their ids), the model and the scorer."""
    s = cfg.scoring
    scorer = dict(method=s.method, temperature=s.temperature, num_samples=s.num_samples)
    if s.method == "sampling":
        scorer.update(max_new_tokens=s.max_new_tokens, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
    return dict(model=cfg.model.path, dtype=cfg.model.dtype, split=s.split, data=cfg.data.to_dict(),
                scorer=scorer, facts=len(ids), shard_size=s.shard_size,
                ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest())


def _shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.parquet"


def write_shard(path: epath.Path, rows: Sequence[dict]) -> None:
    """Write rows to `path` via a hidden temporary sibling and a rename."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    pq.write_table(pa.Table.from_pylist(list(rows), schema=SCHEMA), os.fspath(tmp))
    tmp.rename(path)


def read_rows(workdir: str | os.PathLike) -> pa.Table:
    """Every shard written so far, in shard order."""
    files = sorted(output_dir(workdir).glob("shard-*.parquet"))
    return pa.concat_tables([pq.read_table(os.fspath(f)) for f in files]) if files else SCHEMA.empty_table()


def level_histogram(table: pa.Table) -> dict[str, list[int]]:
    """Relation -> facts per level (0-4)."""
    counts: dict[str, list[int]] = {}
    for relation, level in zip(table.column("relation").to_pylist(), table.column("level").to_pylist()):
        counts.setdefault(relation, [0] * levels.NUM_LEVELS)[level] += 1
    return dict(sorted(counts.items(), key=lambda kv: ALL_RELATIONS.index(kv[0])))


def plot_histogram(histogram: dict[str, list[int]], path: epath.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(histogram)
    counts = np.array([histogram[r] for r in names]).reshape(len(names), levels.NUM_LEVELS)
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 4))
    bottom = np.zeros(len(names))
    for lv in range(levels.NUM_LEVELS):
        ax.bar(names, counts[:, lv], bottom=bottom, label=f"level {lv}")
        bottom += counts[:, lv]
    ax.set_xlabel("relation")
    ax.set_ylabel("facts")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}.png"
    fig.savefig(os.fspath(tmp), dpi=100)
    plt.close(fig)
    tmp.rename(path)


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike, model=None, tokenizer=None,
        mesh: jax.sharding.Mesh | None = None) -> epath.Path:
    """Score the facts of `cfg` into `<workdir>/memorization/`, resuming a run that stopped; returns it.

    `model`, `tokenizer` and `mesh` default to the ones `cfg` describes.
    """
    from tqdm import tqdm

    config_lib.validate(cfg)
    out = output_dir(workdir)
    facts = load_facts(cfg)
    ids = list(facts["id"])
    manifest = _manifest(cfg, ids)
    if (out / MANIFEST).exists():
        found = json.loads((out / MANIFEST).read_text())
        if found != manifest:
            raise ValueError(f"{out} holds scores of another run ({found}); expected {manifest}. "
                             "Use another workdir or remove it.")
    elif runtime.is_writer():
        runtime.atomic_write_json(out / MANIFEST, manifest)
    size = cfg.scoring.shard_size
    num_shards = max(1, -(-len(facts) // size))
    todo = [k for k in range(num_shards) if not (out / _shard_name(k, num_shards)).exists()]
    if todo:
        if mesh is None:
            mesh = runtime.make_mesh(cfg)
        model = model if model is not None else runtime.load_model(cfg, mesh)
        tokenizer = tokenizer if tokenizer is not None else runtime.load_tokenizer(cfg)
    done_facts = len(facts) - sum(min(len(facts), (k + 1) * size) - k * size for k in todo)
    with tqdm(total=len(facts), initial=done_facts, unit="fact", unit_scale=True,
              desc=f"memorization ({cfg.scoring.method})", disable=not runtime.is_writer()) as bar:
        for k in todo:
            shard = facts.select(range(k * size, min(len(facts), (k + 1) * size)))
            end = bar.n + len(shard)
            rows = score_facts(model, tokenizer, list(shard), cfg.scoring, mesh,
                               progress=lambda n: bar.update(min(n, end - bar.n)))
            if runtime.is_writer():  # every process computed the rows; one writes them
                write_shard(out / _shard_name(k, num_shards), rows)
            bar.update(end - bar.n)  # whole facts: the per-batch updates are fractions
    runtime.barrier(f"scored {out}")
    table = read_rows(workdir)
    histogram = level_histogram(table)
    if not runtime.is_writer():
        return out
    runtime.atomic_write_json(out / f"{HISTOGRAM}.json", histogram)
    plot_histogram(histogram, out / f"{HISTOGRAM}.png",
                   f"memorization levels ({cfg.scoring.method}, {cfg.scoring.split}, {table.num_rows} facts)")
    runtime.atomic_write_json(out / DONE, dict(facts=table.num_rows, shards=num_shards))
    logging.info("memorization: %d facts scored in %s", table.num_rows, out)
    return out


def main() -> None:
    """The CLI; its flags are defined here, so importing this module defines none."""
    from absl import app, flags
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "experiment config file", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "experiment directory (gets memorization/)")
    flags.mark_flags_as_required(["config", "workdir"])
    def score(argv: list[str]) -> None:
        del argv
        run(config.value, workdir.value)

    app.run(score)


if __name__ == "__main__":
    main()
