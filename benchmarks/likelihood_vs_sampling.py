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
    args = common.arguments(__doc__, facts=6).parse_args()
    if args.quick:
        args.facts, args.pairs = 1, 2
    from jaxsft import config as config_lib
    from jaxsft import models, tokenization
    from jaxsft.scoring import likelihood

    cfg = config_lib.default_config().scoring
    max_new = 4 if args.quick else cfg.max_new_tokens
    path = common.smollm2_gguf()
    model = models.from_pretrained(path, scan_layers=True)
    tokenizer = tokenization.load_tokenizer(path)
    facts = common.in_domain_facts(args.facts)
    hf = common.torch_model(path)

    def ours():
        likelihood.template_probabilities(model, tokenizer, facts, temperature=cfg.temperature,
                                          batch_size=cfg.batch_size, buckets=tuple(cfg.buckets),
                                          prune_epsilon=cfg.prune_epsilon)

    def theirs():
        common.hf_sampling_protocol(hf, tokenizer, facts, num_samples=cfg.num_samples,
                                    temperature=cfg.temperature, max_new_tokens=max_new)

    timing = common.alternate(ours, theirs, args.pairs)
    common.report("likelihood_vs_sampling", args, dict(
        facts=len(facts), max_new_tokens=max_new, timing=timing,
        seconds_per_fact=dict(a=timing["median_a"] / len(facts), b=timing["median_b"] / len(facts))))


if __name__ == "__main__":
    main()
