"""SFT training sets: facts of one memorization level, balanced across the in-domain relations.

`python -m jaxsft.select --config=configs/demo.py --workdir=runs/demo --config.select.level=2`
reads the scored facts (`memorization/` of the workdir) and writes
`train_sets/level2-size60-seed0/` (datasets `save_to_disk`) with its `manifest.json`.

Selection is a pure function of (scored facts, level, size, seed):

- `level` 0-4 keeps the facts of that level; `mixed` keeps every level and balances the levels
  inside each relation the same way relations are balanced.
- `size` items are shared equally by the in-domain relations. A relation with fewer items than
  its share gives all it has and the rest is shared by the others (water filling); the remainder
  of an uneven split goes one item each to relations in a seed-keyed order.
- Within a relation, items are taken in a seed-keyed permutation of their ids (row order does not
  matter), so for one seed the 60 set is a subset of the 240 set, itself of the 1920 set.
- When the level has fewer in-domain items than `size`, every item is taken and a warning says so;
  the manifest keeps both the requested size and the count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence

import datasets
import ml_collections
import numpy as np
from datasets.table import InMemoryTable

from jaxsft import score
from jaxsft.data.relations import ID_RELATIONS
from jaxsft.errors import UserError
from jaxsft.models import sources
from jaxsft.workdir import Workdir, barrier

LEVELS = ("0", "1", "2", "3", "4")
MIXED = "mixed"
ALL = "all"


def set_name(level: str | int, size: str | int, seed: int) -> str:
    return f"level{level}-size{size}-seed{seed}"


def allocate(available: Mapping[str, int], size: int, order: Sequence[str]) -> dict[str, int]:
    """Share `size` items among groups with `available` items each, as equally as possible.

    Groups are filled smallest first, each taking at most an equal share of what is left; ties
    go in `order`, so the +1s of an uneven split land on the groups last in `order`.
    """
    rank = {g: i for i, g in enumerate(order)}
    groups = sorted(available, key=lambda g: (available[g], rank[g]))
    take, left = {}, size
    for i, g in enumerate(groups):
        take[g] = min(available[g], left // (len(groups) - i))
        left -= take[g]
    return {g: take[g] for g in order if g in take}


def _permutation(ids: Sequence[str], seed: int, key: str) -> list[str]:
    """The ids in an order fixed by (seed, key) and independent of the order they come in."""
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    ordered = sorted(ids)
    return [ordered[i] for i in rng.permutation(len(ordered))]


def select(scored: datasets.Dataset, level: str | int, size: str | int, seed: int, *,
           relations: Sequence[str] = ID_RELATIONS, split: str = "train") -> datasets.Dataset:
    """The training set of `level` (0-4 or mixed) and `size` (a count or all) drawn with `seed`.

    Rows keep every column of `scored`; they are ordered by relation, then by selection order.
    """
    level, size = str(level), str(size)
    if level not in (*LEVELS, MIXED):
        raise ValueError(f"level must be one of {', '.join(LEVELS)} or {MIXED}, not {level!r}")
    if size != ALL and not (size.isdigit() and int(size) > 0):
        raise ValueError(f"size must be a positive count or {ALL!r}, not {size!r}")
    cols = scored.select_columns(["id", "split", "relation", "level"]).to_dict()
    groups: dict[str, dict[str, list[str]]] = {r: {} for r in relations}  # relation -> level -> ids
    row_of: dict[str, int] = {}
    for row, (id_, sp, relation, lv) in enumerate(zip(cols["id"], cols["split"], cols["relation"], cols["level"])):
        if sp != split or relation not in groups or (level != MIXED and str(lv) != level):
            continue
        if id_ in row_of:
            raise UserError(f"fact id {id_!r} appears twice in the scored facts")
        row_of[id_] = row
        groups[relation].setdefault(str(lv), []).append(id_)

    available = {r: sum(map(len, g.values())) for r, g in groups.items()}
    total = sum(available.values())
    wanted = total if size == ALL else int(size)
    if wanted > total:
        logging.warning("level %s has %d in-domain %s items, fewer than the %d requested: taking them all",
                        level, total, split, wanted)
    rng = np.random.default_rng([seed, zlib.crc32(b"relations")])
    per_relation = allocate(available, min(wanted, total), [relations[i] for i in rng.permutation(len(relations))])
    chosen: list[str] = []
    for relation in relations:
        by_level = groups[relation]
        per_level = allocate({lv: len(ids) for lv, ids in by_level.items()}, per_relation[relation],
                             [lv for lv in LEVELS if lv in by_level])
        for lv, count in per_level.items():
            chosen.extend(_permutation(by_level[lv], seed, f"{relation}/{lv}")[:count])
    return scored.select([row_of[i] for i in chosen])


def manifest(train_set: datasets.Dataset, level: str | int, size: str | int, seed: int,
             sources: Iterable[str] = ()) -> dict:
    """What a training set is: its recipe, counts per relation and level, and a fingerprint of its ids."""
    cols = train_set.select_columns(["id", "relation", "level"]).to_dict()
    count = lambda values: {str(k): int(v) for k, v in zip(*np.unique(np.asarray(values, str), return_counts=True))}
    return dict(
        level=str(level), size=str(size), seed=int(seed), count=len(train_set),
        per_relation=count(cols["relation"]), per_level=count([str(v) for v in cols["level"]]),
        ids_sha256=hashlib.sha256("\n".join(cols["id"]).encode()).hexdigest(),
        sources=sorted(sources),
    )


def load_scored(workdir: str | os.PathLike | Workdir, split: str = "train") -> datasets.Dataset:
    """The scored facts of `split` in `workdir` (every shard its manifest names, in order)."""
    table = score.read_rows(workdir, split)
    if not table.num_rows:
        raise FileNotFoundError(f"no scored {split} facts in {score.output_dir(workdir, split).root}: "
                                "run `python -m jaxsft.score` first")
    return datasets.Dataset(InMemoryTable(table))


MANIFEST = "manifest.json"


def build_training_set(cfg: ml_collections.ConfigDict, workdir: str | os.PathLike | Workdir) -> datasets.Dataset:
    """Select `cfg.select` from the workdir's scored facts and save it to `train_sets/<name>`.

    Selection is deterministic, so the set is returned from memory; the saved copy is the record of
    what was trained on. A saved set is never replaced: one whose manifest differs (the scores
    changed since) is an error naming both.
    """
    s = cfg.select
    workdir = Workdir(workdir)
    scored = score.output_dir(workdir, cfg.scoring.split)
    scored_by = scored.read_json(score.MANIFEST).get("model") if scored.exists(score.MANIFEST) else None
    if scored_by is not None:  # the levels are the scoring model's: they train that model only
        differ = score.differences(dict(model=scored_by), dict(model=sources.fingerprint(cfg.model.path)))
        if differ:
            raise UserError(f"the facts in {scored.root} were scored with another model than model.path "
                            f"{cfg.model.path!r} ({differ}): score them with this model in another workdir")
    train_set = select(load_scored(workdir, cfg.scoring.split), s.level, s.size, s.seed, split=cfg.scoring.split)
    info = manifest(train_set, s.level, s.size, s.seed, [f.name for f in scored.glob("shard-*.parquet")])
    info["scored_by"] = scored_by
    out = workdir.train_set(set_name(s.level, s.size, s.seed))
    if out.exists(MANIFEST):
        saved = out.read_json(MANIFEST)
        if saved != info:
            raise UserError(f"the training set {out.root} was selected from other scores (saved {saved}, "
                             f"now {info}); it is kept as it is: use another workdir, or move it away to select again")
        return train_set

    def fill(local) -> None:
        train_set.save_to_disk(os.fspath(local))
        (local / MANIFEST).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")

    out.publish(fill, MANIFEST)
    logging.info("training set %s: %d items %s", out.root, info["count"], info["per_relation"])
    barrier(f"training set {out.root.name}")
    return train_set


def main(argv: list[str] | None = None) -> int | None:
    """The CLI (`jaxsft.cli`); its flags are defined here, so importing this module defines none."""
    from jaxsft import cli

    command = cli.Command(lambda a: build_training_set(a.config, a.workdir),
                          workdir="experiment directory (holds memorization/)")
    return cli.main(command, argv)  # the stage's Dataset is not an exit status


if __name__ == "__main__":
    main()
