"""Memorization scores of facts: R over the 21 completion templates of a relation, and its level.

`score_facts` runs the scorer `cfg.method` names: `likelihood` (the default, teacher-forced
probabilities, see `likelihood`) or `sampling` (the paper's protocol, see `sampling`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from jaxsft.models import Decoder
from jaxsft.scoring import levels, likelihood, sampling

METHODS = ("likelihood", "sampling")
FACT_COLUMNS = ("id", "split", "relation", "subject", "question", "answers")


def layout(cfg: ml_collections.ConfigDict) -> str:
    """The likelihood scorer's layout: `scoring.layout`, where "auto" is packed without a beam."""
    chosen = cfg.get("layout", "auto")
    return ("cached" if cfg.get("beam_depth", 0) else "packed") if chosen == "auto" else chosen


def template_scores(model: Decoder, tokenizer, facts: Sequence[Mapping], cfg: ml_collections.ConfigDict,
                    mesh: jax.sharding.Mesh | None = None,
                    progress: Callable[[float], None] | None = None, stats: dict | None = None) -> np.ndarray:
    """Per-template values [facts, templates]: hit probabilities (likelihood) or hit shares (sampling).

    `stats`, when given, receives the likelihood scorer's counts of work done and pruned.
    """
    if cfg.method == "likelihood":
        return likelihood.template_probabilities(
            model, tokenizer, facts, temperature=cfg.temperature, batch_size=cfg.batch_size,
            buckets=tuple(cfg.buckets), prune_epsilon=cfg.get("prune_epsilon", 0.0),
            beam_width=cfg.get("beam_width", 0), beam_depth=cfg.get("beam_depth", 0), mesh=mesh, progress=progress,
            stats=stats, layout=layout(cfg))
    if cfg.method == "sampling":
        return sampling.template_hit_rates(
            model, tokenizer, facts, temperature=cfg.temperature, num_samples=cfg.num_samples,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, buckets=tuple(cfg.buckets),
            top_k=cfg.top_k, top_p=cfg.top_p, seed=cfg.seed, progress=progress)
    raise ValueError(f"unknown scoring method {cfg.method!r}; choose one of {METHODS}")


def score_facts(model: Decoder, tokenizer, facts: Sequence[Mapping], cfg: ml_collections.ConfigDict,
                mesh: jax.sharding.Mesh | None = None,
                progress: Callable[[float], None] | None = None, stats: dict | None = None) -> list[dict]:
    """One row per fact: its `FACT_COLUMNS`, `template_scores`, `R` and `level`.

    Likelihood levels are the ones the sampling protocol (`cfg.num_samples` per template) most
    likely gives (`levels.expected_level`); sampling levels are the paper's thresholds on R.
    """
    scores = template_scores(model, tokenizer, facts, cfg, mesh, progress, stats)
    rows = []
    for fact, values in zip(facts, scores):
        r = float(np.mean(values))
        level = (levels.expected_level(values, cfg.num_samples) if cfg.method == "likelihood"
                 else levels.level(r))
        rows.append({**{c: fact[c] for c in FACT_COLUMNS}, "template_scores": [float(v) for v in values],
                     "R": r, "level": level})
    return rows
