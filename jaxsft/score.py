"""Score the memorization of facts: `memorization/` of the workdir (`test_scores/memorization/` for
the test or dev split).

    python -m jaxsft.score --config=configs/demo.py --workdir=runs/demo [--config.scoring.method=sampling]

Writes one parquet shard per `scoring.shard_size` facts (`shard-00000-of-00003.parquet`, one row
per fact: id, split, relation, subject, question, answers, template_scores, R, level), then the
per-relation level histogram (`levels.json`, `levels.png`) and the completion marker `done.json`.
Shards are written atomically; `manifest.json` pins what is scored, so a run started again skips
the shards it has and scores the rest, and a run of a different scoring config is refused. Only the
shards the manifest names are read: a stray file in the directory changes nothing.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import jax
import ml_collections
import pyarrow as pa
from absl import logging

from jaxsft import config as config_lib
from jaxsft import runtime
from jaxsft.data import entity_questions
from jaxsft.data.relations import ALL_RELATIONS, ID_RELATIONS, OOD_RELATIONS
from jaxsft.scoring import levels, score_facts
from jaxsft.workdir import Workdir, barrier

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


def output_dir(workdir: str | os.PathLike | Workdir, split: str = "train") -> Workdir:
    return Workdir(workdir).scores(split)


def memorization_done(workdir: str | os.PathLike | Workdir, split: str = "train") -> bool:
    """Whether `run` finished for `split` in `workdir`: every shard, the histogram and the marker are there."""
    return output_dir(workdir, split).exists(DONE)


def _manifest(cfg: ml_collections.ConfigDict, ids: Sequence[str]) -> dict:
    """What the output is: the facts (a fingerprint of their ids), the model and the scorer."""
    s = cfg.scoring
    scorer = dict(method=s.method, temperature=s.temperature, num_samples=s.num_samples)
    if s.method == "sampling":
        scorer.update(max_new_tokens=s.max_new_tokens, top_k=s.top_k, top_p=s.top_p, seed=s.seed)
    return dict(model=cfg.model.path, dtype=cfg.model.dtype, split=s.split, data=cfg.data.to_dict(),
                scorer=scorer, facts=len(ids), shard_size=s.shard_size,
                ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest())


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.parquet"


def read_rows(workdir: str | os.PathLike | Workdir, split: str = "train", columns: Sequence[str] | None = None) -> pa.Table:
    """The shards written so far for `split`, in shard order: those its manifest names, no others."""
    out = output_dir(workdir, split)
    if not out.exists(MANIFEST):
        return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(list(columns))
    m = out.read_json(MANIFEST)
    n = max(1, -(-m["facts"] // m["shard_size"]))
    files = [out.path(shard_name(k, n)) for k in range(n)]
    tables = out.read_parquet([f for f in files if f.exists()], None if columns is None else list(columns))
    if tables:
        return pa.concat_tables(tables)
    return SCHEMA.empty_table() if columns is None else SCHEMA.empty_table().select(list(columns))


def level_histogram(table: pa.Table) -> dict[str, list[int]]:
    """Relation -> facts per level (0-4)."""
    counts: dict[str, list[int]] = {}
    for relation, level in zip(table.column("relation").to_pylist(), table.column("level").to_pylist()):
        counts.setdefault(relation, [0] * levels.NUM_LEVELS)[level] += 1
    return dict(sorted(counts.items(), key=lambda kv: ALL_RELATIONS.index(kv[0])))


def plot_histogram(histogram: dict[str, list[int]], title: str):
    """A stacked bar chart of facts per level and relation (a matplotlib figure)."""
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
    return fig


def run(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir, model=None, tokenizer=None,
        mesh: jax.sharding.Mesh | None = None) -> Workdir:
    """Score the facts of `cfg` into the workdir's scores of `cfg.scoring.split`, resuming a run that
    stopped; returns that directory. `model`, `tokenizer` and `mesh` default to the ones `cfg` describes.
    """
    from tqdm import tqdm

    config_lib.validate(cfg)
    out = output_dir(workdir, cfg.scoring.split)
    facts = load_facts(cfg)
    ids = list(facts["id"])
    manifest = _manifest(cfg, ids)
    if out.exists(MANIFEST):
        found = out.read_json(MANIFEST)
        if found != manifest:
            raise ValueError(f"{out.root} holds scores of another run ({found}); expected {manifest}. "
                             "Use another workdir or remove it.")
    else:
        out.write_json(MANIFEST, manifest)
    size = cfg.scoring.shard_size
    num_shards = max(1, -(-len(facts) // size))
    todo = [k for k in range(num_shards) if not out.exists(shard_name(k, num_shards))]
    if todo:
        if mesh is None:
            mesh = runtime.make_mesh(cfg)
        model = model if model is not None else runtime.load_model(cfg, mesh)
        tokenizer = tokenizer if tokenizer is not None else runtime.load_tokenizer(cfg)
    done_facts = len(facts) - sum(min(len(facts), (k + 1) * size) - k * size for k in todo)
    with tqdm(total=len(facts), initial=done_facts, unit="fact", unit_scale=True,
              desc=f"memorization ({cfg.scoring.method})", disable=jax.process_index() != 0) as bar:
        for k in todo:
            shard = facts.select(range(k * size, min(len(facts), (k + 1) * size)))
            end = bar.n + len(shard)
            rows = score_facts(model, tokenizer, list(shard), cfg.scoring, mesh,
                               progress=lambda n: bar.update(min(n, end - bar.n)))
            # every process computed the rows; one writes them
            out.write_parquet(shard_name(k, num_shards), pa.Table.from_pylist(list(rows), schema=SCHEMA))
            bar.update(end - bar.n)  # whole facts: the per-batch updates are fractions
    barrier(f"scored {out.root}")
    table = read_rows(workdir, cfg.scoring.split)
    histogram = level_histogram(table)
    out.write_json(f"{HISTOGRAM}.json", histogram)
    out.write_figure(f"{HISTOGRAM}.png", plot_histogram(
        histogram, f"memorization levels ({cfg.scoring.method}, {cfg.scoring.split}, {table.num_rows} facts)"), dpi=100)
    out.write_json(DONE, dict(facts=table.num_rows, shards=num_shards))
    logging.info("memorization: %d facts scored in %s", table.num_rows, out.root)
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
