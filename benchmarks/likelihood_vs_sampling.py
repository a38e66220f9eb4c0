"""(c) What the likelihood scorer buys: jaxsft's likelihood scoring (A) against the paper's sampling
protocol run by transformers `generate` (B, as in `sampling_vs_generate.py`), seconds per fact on N
in-domain facts, SmolLM2-135M float32.

    python benchmarks/likelihood_vs_sampling.py [--facts 6] [--pairs 5] [--quick]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import common


def main() -> None:
    from jaxsft import scoring

    args, cfg, max_new, model, tokenizer, facts, hf = common.scoring_workload(__doc__, facts=6)

    def ours():
        scoring.template_scores(model, tokenizer, facts, cfg)  # as `score` runs it

    def theirs():
        common.hf_sampling_protocol(hf, tokenizer, facts, num_samples=cfg.num_samples,
                                    temperature=cfg.temperature, max_new_tokens=max_new)

    timing = common.alternate(ours, theirs, args.pairs)
    common.report("likelihood_vs_sampling", args, dict(
        facts=len(facts), max_new_tokens=max_new, timing=timing,
        seconds_per_fact=dict(a=timing["median_a"] / len(facts), b=timing["median_b"] / len(facts))))


if __name__ == "__main__":
    main()
