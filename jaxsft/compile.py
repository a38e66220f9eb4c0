"""Ahead-of-time compile for a Cloud TPU slice, on any machine: does a config fit, and at what cost?

    python -m jaxsft.compile --config=configs/llama2_7b.py --topology=v5e-8

The slice's devices come from libtpu as compile-only devices (no TPU attached), the model from its
architecture alone (`nnx.eval_shape`: no weights, no download), and each step is compiled from
`jax.ShapeDtypeStruct`s carrying the `NamedSharding`s a run would use:

- train: the trainer's own compiled step (`training.step.compile_train_step`), AdamW state included;
  with `train.lora.rank > 0` the state holds the qwix adapters only and the base is a frozen input;
- score: the likelihood scorer's batch (`scoring.likelihood`): prompts [scoring.batch_size, longest
  bucket] prefilled, their continuations teacher-forced on the KV cache, only scored positions unembedded;
- decode: one token for every generated row against a KV cache of the longest prompt + new tokens.

Per chip it prints what XLA's buffer assignment holds (`compiled.memory_analysis()`: arguments,
outputs, temporaries, code) against the chip's HBM, and the FLOPs of one step. XLA itself refuses a
program over the HBM it may use (15.75 of a v5e's 16 GiB, 30.75 of a v4's 32): that step is reported
as not fitting, with XLA's figure. Exits 1 when a step does not fit, 2 when the config
cannot be laid out on the slice at all (a batch the devices do not divide, an unknown slice).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxsft import hardware, model_zoo, runtime
from jaxsft.errors import UserError
from jaxsft.models import Decoder, KVCache, ModelConfig
from jaxsft.models import sharding
from jaxsft.workdir import Workdir

STEPS = ("train", "score", "decode")


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Per-chip memory (bytes) and FLOPs of one compiled step; `error` when XLA refused it."""

    step: str
    shapes: str
    arguments: int = 0
    outputs: int = 0
    aliased: int = 0  # outputs written in place of donated arguments
    temporaries: int = 0
    code: int = 0
    flops: float = 0.0  # per chip
    seconds: float = 0.0  # compile time
    error: str = ""

    @property
    def total(self) -> int:
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    def fits(self, hbm_bytes: int) -> bool:
        return not self.error and self.total <= hbm_bytes


@dataclasses.dataclass(frozen=True)
class Program:
    """A step to compile: `compile()` as a run compiles it; `fn(*args)` the same computation, unsharded,
    for counting FLOPs."""

    step: str
    shapes: str
    compile: Callable[[], jax.stages.Compiled]
    fn: Callable
    args: tuple


def _flops(cost) -> float:
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def unsharded(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def measure(program: Program, num_devices: int, unrolled: Program | None = None) -> StepCost:
    """Compile, and read XLA's memory and cost analyses; an out-of-memory compile becomes `error`.

    XLA's cost analysis counts a loop body once, so with a layer scan the FLOPs come from `unrolled`
    (the same step with the layers unrolled), lowered unsharded and split evenly over the devices.
    """
    start = time.perf_counter()
    try:
        compiled = program.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return StepCost(program.step, program.shapes, seconds=time.perf_counter() - start,
                        error=str(e).splitlines()[0])
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    if unrolled is None:
        flops = _flops(compiled.cost_analysis())
    else:
        flops = _flops(jax.jit(unrolled.fn).lower(*unsharded(unrolled.args)).cost_analysis()) / num_devices
    return StepCost(program.step, program.shapes, arguments=mem.argument_size_in_bytes,
                    outputs=mem.output_size_in_bytes, aliased=mem.alias_size_in_bytes,
                    temporaries=mem.temp_size_in_bytes, code=mem.generated_code_size_in_bytes, flops=flops,
                    seconds=seconds)


# -- the model and its shardings, abstract ------------------------------------------------------------

def model_config(cfg: ml_collections.ConfigDict) -> ModelConfig:
    """The architecture of `cfg.model.path` (embedded table, config.json or GGUF header), with the
    config's layer scan and remat."""
    return ModelConfig.from_hf(model_zoo.hf_config(cfg.model.path), source=cfg.model.path,
                               scan_layers=cfg.model.scan_layers, remat=cfg.model.remat)


def abstract_model(cfg: ml_collections.ConfigDict, **overrides) -> tuple[nnx.GraphDef, nnx.State]:
    """Graph and params of the model, every leaf a ShapeDtypeStruct: nothing is allocated."""
    arch = model_config(cfg).replace(**overrides)
    model = nnx.eval_shape(lambda: Decoder(arch, dtype=runtime.dtype(cfg.model.dtype),
                                           param_dtype=runtime.dtype(cfg.model.param_dtype), rngs=nnx.Rngs(0)))
    return nnx.split(model)


def placed(tree, mesh: Mesh):
    """ShapeDtypeStructs with the shardings a run uses: params and their optimizer moments by their
    logical axes, anything else replicated."""
    from jaxsft.training import step

    return step.abstract(tree, step.shardings(tree, mesh))


def _batch(mesh: Mesh, shape: tuple[int, ...], dtype=jnp.int32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape)))


def _check_batch(name: str, rows: int, mesh: Mesh) -> None:
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    if rows % ways:
        raise ValueError(f"{name}={rows} is not divisible by the {ways} data-parallel devices (data x fsdp)")


# -- the steps --------------------------------------------------------------------------------------

def train_program(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: nnx.State, mesh: Mesh
                  ) -> Program:
    """The trainer's step, compiled exactly as a run compiles it (adapters and a frozen base with LoRA)."""
    from jaxsft.training import lora, optim, step

    t = cfg.train
    frozen = ()
    if lora.enabled(t):
        adapted = nnx.eval_shape(lambda p: lora.apply(nnx.merge(graphdef, p), t.lora, seed=t.seed, mesh=mesh), params)
        graphdef, params, frozen = lora.split(adapted)
    if t.batch_size % t.grad_accum:
        raise ValueError(f"train.batch_size={t.batch_size} does not split into grad_accum={t.grad_accum} microbatches")
    _check_batch("train.batch_size // train.grad_accum", t.batch_size // t.grad_accum, mesh)
    optimizer = optim.optimizer(t)
    state = jax.eval_shape(lambda p: step.init_state(p, jax.random.key_data(jax.random.key(0)), optimizer=optimizer),
                           params)
    shape = (t.batch_size, t.max_length)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32) for k in step.BATCH_KEYS}
    fn = functools.partial(step.train_step, graphdef=graphdef, optimizer=optimizer, accum=t.grad_accum)
    return Program("train", f"batch {shape[0]} x {shape[1]}, accum {t.grad_accum}",
                   lambda: step.compile_train_step(graphdef, optimizer, t.grad_accum, state, mesh, shape, frozen),
                   fn, (state, batch, frozen, jax.ShapeDtypeStruct((), jnp.float32)))


def score_program(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: nnx.State, mesh: Mesh
                  ) -> Program:
    """The likelihood scorer's pass at its largest shapes: in the packed layout (the default
    without a beam), rows of the longest prompt bucket plus the longest continuation; in the
    cached layout, prompts prefilled once, their continuations teacher-forced on the gathered KV
    cache, only scored positions unembedded."""
    from jaxsft import scoring
    from jaxsft.scoring import likelihood, packed

    s = cfg.scoring
    _check_batch("scoring.batch_size", s.batch_size, mesh)
    temperature = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
    longest = max(s.buckets) + max(likelihood.CONTINUATION_BUCKETS)
    if scoring.layout(s) == "packed":
        rows = likelihood.default_items_per_call(s.batch_size, mesh.shape["data"] * mesh.shape["fsdp"])
        length = next((n for n in packed.ROW_LENGTHS if n >= longest), max(packed.ROW_LENGTHS))
        step = packed._packed_pass.__wrapped__  # the function under its nnx.jit
        args = ((placed(params, mesh),) + tuple(_batch(mesh, (rows, length)) for _ in range(4))
                + (_batch(mesh, (rows, length // 2)), _batch(mesh, (rows, length)), _batch(mesh, (rows, length)),
                   temperature))
        what = f"{rows} packed rows x {length} tokens"
    else:
        prompts, items = s.batch_size, likelihood.ITEMS_PER_PROMPT * s.batch_size
        prompt_len, cont_len = max(s.buckets), max(likelihood.CONTINUATION_BUCKETS)
        step = likelihood._continuation_logprobs.__wrapped__
        args = (placed(params, mesh), _batch(mesh, (prompts, prompt_len)), _batch(mesh, (prompts, prompt_len)),
                _batch(mesh, (items,)), _batch(mesh, (items, cont_len)), _batch(mesh, (items, cont_len)), temperature)
        what = f"{prompts} prompts x {prompt_len}, {items} continuations x {cont_len}"

    def fn(params, *batch):
        return step(nnx.merge(graphdef, params), *batch)

    return Program("score", what, lambda: jax.jit(fn).lower(*args).compile(), fn, args)


def decode_token(params: nnx.State, cache: KVCache, token: jax.Array, *, graphdef: nnx.GraphDef
                 ) -> tuple[jax.Array, KVCache]:
    """One greedy step: append `token` [B] to the cache, return the next token and the cache."""
    model = nnx.merge(graphdef, params)
    hidden, cache = model.hidden_states(token[:, None], jnp.ones((token.shape[0], 1), jnp.int32), cache=cache)
    return jnp.argmax(model.unembed(hidden[:, 0]), -1).astype(jnp.int32), cache


def decode_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int]:
    """(rows, cache slots) of the largest generation the config runs: QA evaluation, and sampling
    scoring (each prompt's cache repeated for its samples)."""
    e, s = cfg.eval, cfg.scoring
    shapes = [(e.batch_size, max(e.buckets) + e.max_new_tokens)]
    if s.method == "sampling":
        shapes.append((s.batch_size * s.num_samples, max(s.buckets) + s.max_new_tokens))
    return max(r for r, _ in shapes), max(n for _, n in shapes)


def decode_program(cfg: ml_collections.ConfigDict, graphdef: nnx.GraphDef, params: nnx.State, mesh: Mesh
                   ) -> Program:
    arch = model_config(cfg)
    rows, slots = decode_shape(cfg)
    _check_batch("decode rows", rows, mesh)
    kv_shape = (arch.num_layers, rows, slots, arch.num_kv_heads, arch.head_dim)
    kv_spec = sharding.logical_to_spec(("layers", "batch", "length", "heads", None), kv_shape, mesh)
    kv = jax.ShapeDtypeStruct(kv_shape, runtime.dtype(cfg.model.dtype), sharding=NamedSharding(mesh, kv_spec))
    cache = KVCache(kv, kv, _batch(mesh, (rows, slots), jnp.bool_),
                    jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec())))
    fn = functools.partial(decode_token, graphdef=graphdef)
    args = (placed(params, mesh), cache, _batch(mesh, (rows,)))
    jitted = jax.jit(fn, donate_argnums=1,
                     out_shardings=(sharding.batch_sharding(mesh, 1), jax.tree.map(lambda x: x.sharding, cache)))
    return Program("decode", f"{rows} rows, {slots} cache slots", lambda: jitted.lower(*args).compile(), fn, args)


PROGRAMS = {"train": train_program, "score": score_program, "decode": decode_program}


def compile_config(cfg: ml_collections.ConfigDict, devices: Sequence, steps: Sequence[str] = STEPS
                   ) -> tuple[Mesh, list[StepCost]]:
    """Compile `steps` of `cfg` for `devices` (compile-only TPU devices, or real ones)."""
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    graphdef, params = abstract_model(cfg)
    unrolled = abstract_model(cfg, scan_layers=False)[0] if cfg.model.scan_layers else None
    costs = []
    for name in steps:
        build = PROGRAMS[name]
        costs.append(measure(build(cfg, graphdef, params, mesh), mesh.size,
                             unrolled and build(cfg, unrolled, params, mesh)))
    return mesh, costs


# -- the report ------------------------------------------------------------------------------------

def _gib(n: float) -> str:
    return f"{n / hardware.GiB:.2f}"


def _size(n: float) -> str:
    return f"{n / hardware.GiB:.2f}G" if abs(n) >= hardware.GiB / 10 else f"{n / (1 << 20):.1f}M"


def _lora_note(cfg: ml_collections.ConfigDict) -> str:
    c = cfg.train.lora
    if c.rank <= 0:
        return ""
    return (f"; train: LoRA rank {c.rank}, alpha {c.alpha:g} on {', '.join(c.targets)}"
            + (", NF4 base" if c.quantize_base else ""))


def report(cfg: ml_collections.ConfigDict, target: hardware.Slice, mesh: Mesh, costs: Sequence[StepCost]) -> str:
    chip = target.chip
    arch = model_config(cfg)
    lines = [
        f"{cfg.model.path} on {target.accelerator_type} ({target.topology_name}, {len(mesh.devices.flat)} devices)"
        f" mesh {dict(mesh.shape)}; params {cfg.model.param_dtype}, compute {cfg.model.dtype}, "
        f"scan_layers={arch.scan_layers}, remat={arch.remat}" + _lora_note(cfg),
        f"per chip (HBM {_size(chip.hbm_bytes)}):",
        f"{'step':<7} {'arguments':>9} {'outputs':>8} {'aliased':>8} {'temps':>7} {'code':>6} {'total':>7} "
        f"{'fits':>4} {'TFLOP/chip':>10} {'ms@peak':>8} {'compile s':>9}  shapes",
    ]
    for c in costs:
        if c.error:
            lines.append(f"{c.step:<7} {'compile refused: ' + c.error}  [{c.shapes}]")
            continue
        lines.append(
            f"{c.step:<7} {_size(c.arguments):>9} {_size(c.outputs):>8} {_size(c.aliased):>8} "
            f"{_size(c.temporaries):>7} {_size(c.code):>6} {_size(c.total):>7} {'yes' if c.fits(chip.hbm_bytes) else 'NO':>4} "
            f"{c.flops / 1e12:>10.3g} {1e3 * c.flops / chip.peak_bf16_flops:>8.3g} {c.seconds:>9.1f}  {c.shapes}")
    return "\n".join(lines)


def misfits(target: hardware.Slice, costs: Sequence[StepCost]) -> list[str]:
    """One message per step that does not fit, saying by how much."""
    hbm = target.chip.hbm_bytes
    out = []
    for c in costs:
        if c.error:
            out.append(f"{c.step} does not fit a {target.chip.name} chip: XLA refused it: {c.error}")
        elif not c.fits(hbm):
            out.append(f"{c.step} does not fit a {target.chip.name} chip: needs {_gib(c.total)} GiB per chip, "
                       f"has {_gib(hbm)} GiB (over by {_gib(c.total - hbm)} GiB)")
    return out


# -- command line ----------------------------------------------------------------------------------

def define_flags(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("topology", None, "TPU slice: v5e-8, v4-8, v5p-8, v6e-8, ... or v5e:2x4.", flag_values=fv)
    flags.DEFINE_list("steps", list(STEPS), f"Steps to compile, of {', '.join(STEPS)}.", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the figures to this file, as JSON.", flag_values=fv)


def run(invocation) -> int:
    """Compile, print the report (and the JSON); 1 when a step does not fit. A config that cannot be
    laid out on the slice (a batch the devices do not divide, an unknown slice) is a `UserError`."""
    cfg, args = invocation.config, invocation.flags
    unknown = sorted(set(args["steps"]) - set(STEPS))
    if unknown:
        raise UserError(f"--steps: unknown steps {unknown}; choose from {', '.join(STEPS)}")
    try:
        target = hardware.parse_slice(args["topology"])
        mesh, costs = compile_config(cfg, target.devices(), args["steps"])
    except UserError:
        raise
    except ValueError as e:  # a config that cannot be laid out on this slice
        raise UserError(str(e)) from e
    print(report(cfg, target, mesh, costs), flush=True)
    problems = misfits(target, costs)
    if args["json"]:
        Workdir(os.path.dirname(os.path.abspath(args["json"]))).write_json(os.path.basename(args["json"]), dict(
            model=cfg.model.path, slice=target.accelerator_type, topology=target.topology_name,
            lora=cfg.train.lora.to_dict() if cfg.train.lora.rank > 0 else None,
            hbm_bytes=target.chip.hbm_bytes, mesh=dict(mesh.shape), fits=not problems,
            steps=[dict(dataclasses.asdict(c), total=c.total, fits=c.fits(target.chip.hbm_bytes)) for c in costs]))
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int | None:
    """The CLI (`jaxsft.cli`): exit 0 fits, 1 a step does not fit, 2 the config cannot be laid out."""
    from jaxsft import cli

    return cli.main(cli.Command(run, workdir=None, define=define_flags, required=("topology",)), argv)


if __name__ == "__main__":
    main()
