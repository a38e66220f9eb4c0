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
from jaxsft.data.files import check_schema, check_unique
from jaxsft.data.relations import ALL_RELATIONS, ID_RELATIONS, OOD_RELATIONS
from jaxsft.errors import UserError
from jaxsft.models import sources
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
    else:
        scorer.update(prune_epsilon=s.prune_epsilon)
        if s.beam_depth:  # recorded only when on: scores of earlier versions keep their provenance
            scorer.update(beam_width=s.beam_width, beam_depth=s.beam_depth)
    return dict(model=sources.fingerprint(cfg.model.path), dtype=cfg.model.dtype, split=s.split, data=cfg.data.to_dict(),
                scorer=scorer, facts=len(ids), shard_size=s.shard_size,
                ids_sha256=hashlib.sha256("\n".join(ids).encode()).hexdigest())


def differences(found: dict, expected: dict, prefix: str = "") -> str:
    """What differs between a recorded provenance and the one asked for, as `key: found != expected`
    (a model's `path` aside: the same files may lie elsewhere)."""
    out = []
    for key in sorted(set(found) | set(expected)):
        a, b = found.get(key), expected.get(key)
        if key == "path" and prefix.endswith("model."):
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = differences(a, b, f"{prefix}{key}.")
            out += [inner] if inner else []
        elif a != b:
            out.append(f"{prefix}{key}: recorded {a!r}, now {b!r}")
    return "; ".join(out)


def shard_name(k: int, n: int) -> str:
    return f"shard-{k:05d}-of-{n:05d}.parquet"


def read_rows(workdir: str | os.PathLike | Workdir, split: str = "train", columns: Sequence[str] | None = None) -> pa.Table:
    """The shards written so far for `split`, in shard order: those its manifest names, no others."""
    out = output_dir(workdir, split)
    if not out.exists(MANIFEST):
        return pa.schema([SCHEMA.field(c) for c in columns or SCHEMA.names]).empty_table()
    m = out.read_json(MANIFEST)
    n = max(1, -(-m["facts"] // m["shard_size"]))
    files = [f for f in (out.path(shard_name(k, n)) for k in range(n)) if f.exists()]
    expected = pa.schema([SCHEMA.field(c) for c in columns or SCHEMA.names])
    tables = [check_schema(t, expected, f) for f, t in zip(files, out.read_parquet(files))]
    table = pa.concat_tables(tables) if tables else expected.empty_table()
    check_unique(table, "id", out.root)
    return table


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
    stopped (a finished one is left as it is); returns that directory. Scores of another model, data
    or scorer are refused. `model`, `tokenizer` and `mesh` default to the ones `cfg` describes.
    """
    from tqdm import tqdm

    config_lib.validate(cfg)
    out = output_dir(workdir, cfg.scoring.split)
    facts = load_facts(cfg)
    ids = list(facts["id"])
    manifest = _manifest(cfg, ids)
    if out.exists(MANIFEST):
        differ = differences(out.read_json(MANIFEST), manifest)
        if differ:
            raise UserError(f"{out.root} holds scores of another run ({differ}): use another workdir, or move "
                            "that directory away")
        if out.exists(DONE):
            return out
    else:
        out.write_json(MANIFEST, manifest)
    size = cfg.scoring.shard_size
    num_shards = max(1, -(-len(facts) // size))
    todo = [k for k in range(num_shards) if not out.exists(shard_name(k, num_shards))]
    if todo:
        if mesh is None:
            mesh = runtime.make_mesh(cfg)
        if model is None or tokenizer is None:
            model, tokenizer = runtime.load(cfg, mesh)
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


def main(argv: list[str] | None = None) -> int | None:
    """The CLI (`jaxsft.cli`); its flags are defined here, so importing this module defines none."""
    from jaxsft import cli

    command = cli.Command(lambda a: run(a.config, a.workdir), workdir="experiment directory (gets memorization/)")
    return cli.main(command, argv)


if __name__ == "__main__":
    main()
