"""A grid of cells in one run: one model load, one compilation per shape, the baseline, and cells
that equal the same cell trained alone.

Compilations are counted with the `jax.monitoring` event JAX records for each XLA compilation
(`/jax/core/compile/backend_compile_duration`, with the function's name). Programs compiled by one
test serve the later ones of the process, so each test here uses shapes (sequence lengths, buckets)
that no other test file uses: its counts start from zero whatever ran before.
"""

from __future__ import annotations

import collections
import contextlib
import json
import pathlib
import runpy
import shutil
import types

import datasets
import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import hf_models
from conftest import tiny_experiment
from jaxsft import evaluate, models, report, run, runtime, train
from jaxsft import config as config_lib
from jaxsft.errors import UserError
from jaxsft.models import sharding
from jaxsft.training import train as train_cell

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
SIZES, SEEDS = ("4", "8"), (0, 1)


@contextlib.contextmanager
def counting():
    """Counts, while inside: model loads (paths) and XLA compilations (function names)."""
    counts = types.SimpleNamespace(loads=[], compiled=collections.Counter())

    def listener(event: str, seconds: float, **kwargs) -> None:
        if event == BACKEND_COMPILE:
            counts.compiled[kwargs.get("fun_name")] += 1

    real = models.from_pretrained

    def from_pretrained(source, *args, **kwargs):
        counts.loads.append(str(getattr(source, "local", source)))
        return real(source, *args, **kwargs)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(models, "from_pretrained", from_pretrained)
            yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def grid_config(root: pathlib.Path):
    """The tiny experiment as a grid: 2 sizes x 2 seeds (2 and 4 steps: cosine schedules of two
    lengths), on 8 devices (fsdp 4 x tensor 2)."""
    path = tiny_experiment(root, max_length=104, batch_size=4, epochs=2, learning_rate=1e-3)
    cfg = runpy.run_path(str(path))["get_config"]()
    cfg.mesh.update(data=1, fsdp=4, tensor=2)
    cfg.eval.update(max_new_tokens=5, buckets=(72, 100))
    cfg.grid.update(levels=("mixed",), sizes=SIZES, seeds=SEEDS)
    return cfg


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The grid run once, its loads and compilations counted and the report's inputs kept."""
    root = tmp_path_factory.mktemp("grid")
    cfg = grid_config(root)
    written = {}
    real_write = report.write

    def write(workdir, **kwargs):
        written.update(kwargs)
        return real_write(workdir, **kwargs)

    with counting() as counts, pytest.MonkeyPatch.context() as mp:
        mp.setattr(report, "write", write)
        run.run(cfg, root / "exp")
    return types.SimpleNamespace(cfg=cfg, workdir=root / "exp", counts=counts, report=written)


def cell_config(cfg, size: str, seed: int):
    return run.stage_config(cfg, select=dict(level="mixed", size=size, seed=seed))


def test_a_grid_loads_the_model_once_and_compiles_once_per_shape(grid):
    cfg, counts = grid.cfg, grid.counts
    assert len(counts.loads) == 1, counts.loads
    steps = {train.run_dir(cell_config(cfg, size, seed), grid.workdir).read_json("train_summary.json")["steps"]
             for size in SIZES for seed in SEEDS}
    assert steps == {2, 4}  # two schedule lengths, one program: the learning rate is an input
    assert counts.compiled["jit(train_step)"] == 1, counts.compiled
    assert counts.compiled["jit(init_state)"] == 1, counts.compiled
    # 5 evaluations (the baseline and 4 fine-tuned models): decoding compiled once per prompt bucket at most.
    assert 1 <= counts.compiled["jit(_decode)"] <= len(cfg.eval.buckets), counts.compiled


def test_the_baseline_is_the_base_model_on_the_cells_test_items(grid):
    cfg, workdir = grid.cfg, grid.workdir
    out = workdir / "baseline" / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    cell = train.run_dir(cell_config(cfg, "8", 1), workdir)
    cell_predictions = [json.loads(line) for line in cell.read_text("eval", "predictions.jsonl").splitlines()]
    assert [p["id"] for p in predictions] == [p["id"] for p in cell_predictions] and metrics["items"] > 0
    assert metrics["settings"] == json.loads(json.dumps(evaluate.baseline_settings(cfg)))
    assert metrics["model"] == cfg.model.path
    # The report gets the baseline row and every cell's item counts per role and level.
    base = grid.report["baseline"]
    assert (base.level, base.size, base.seed, base.items) == (report.BASELINE, "0", 0, 0)
    assert base.count == {role: {int(lv): n for lv, n in c.items()} for role, c in metrics["count"].items()}
    assert base.macro["id"] == pytest.approx(metrics["macro"]["id"])
    assert len(grid.report["cells"]) == len(SIZES) * len(SEEDS)
    for c in grid.report["cells"]:
        assert c.count == base.count  # the same test items, counted the same way


def test_a_cell_of_the_grid_equals_the_cell_trained_alone(grid, tmp_path):
    """The last cell (its base parked and restored by the 3 cells before it) against
    `python -m jaxsft.train` on the same scored facts: the same weights, bit for bit."""
    shutil.copytree(grid.workdir / "memorization", tmp_path / "memorization")
    cell = cell_config(grid.cfg, "8", 1)
    alone = train.run(cell, tmp_path)
    assert alone.step == alone.total_steps == 4
    got = load_file(train.run_dir(cell, grid.workdir).path("model", "model.safetensors"))
    expected = load_file(train.run_dir(cell, tmp_path).path("model", "model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_a_rerun_loads_nothing_and_another_baseline_setting_is_refused(grid):
    with counting() as counts:
        run.run(grid.cfg, grid.workdir)
    assert counts.loads == [] and not counts.compiled["jit(train_step)"]
    other = run.stage_config(grid.cfg, eval=dict(max_new_tokens=6))
    with pytest.raises(UserError, match="baseline/eval holds an evaluation with other settings"):
        evaluate.baseline(other, grid.workdir)


# -- the trainer from a loaded base -------------------------------------------------------------------

def params_of(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def qa_set(n: int) -> datasets.Dataset:
    names = ["Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal"]
    return datasets.Dataset.from_dict({"question": [f"Where is {names[i % 8]}?" for i in range(n)],
                                       "answers": [[["Paris", "Rome", "Oslo"][i % 3]] for i in range(n)]})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    hf_models.build("llama2", directory)
    hf_models.char_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.parametrize("rank", [0, 4], ids=["full", "lora"])
def test_training_from_a_loaded_base_leaves_it_untouched_and_equals_loading_one(model_dir, tmp_path, rank):
    c = config_lib.default_config()
    c.model.path = str(model_dir)
    c.train.update(max_length=40, batch_size=4, epochs=2, checkpoint_every=0, learning_rate=1e-3)
    c.train.lora.rank = rank
    mesh = sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4])
    base, tokenizer = runtime.load(c, mesh)
    before = params_of(base)
    placed = {p: v[...].sharding for p, v in nnx.to_flat_state(nnx.state(base))}
    with counting() as counts:
        first = train_cell(c, tmp_path / "a", qa_set(8), mesh=mesh, base=base, tokenizer=tokenizer)
        second = train_cell(c, tmp_path / "b", qa_set(4), mesh=mesh, base=base, tokenizer=tokenizer)
    assert (first.total_steps, second.total_steps) == (4, 2)
    assert counts.loads == [] and counts.compiled["jit(train_step)"] == 1, counts.compiled
    after = params_of(base)
    assert after.keys() == before.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    assert {p: v[...].sharding for p, v in nnx.to_flat_state(nnx.state(base))} == placed
    alone = train_cell(c, tmp_path / "alone", qa_set(4), mesh=mesh)  # loads its own model
    got, expected = params_of(second.model), params_of(alone.model)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert not np.array_equal(got["layers.q_proj.kernel"], before["layers.q_proj.kernel"])  # it did train


def test_parked_model_is_on_the_host_inside_and_back_bit_for_bit(model_dir):
    mesh = sharding.make_mesh(2, 2, 2)  # replicas over data: each distinct shard kept once
    model = models.from_pretrained(model_dir, mesh=mesh)
    before = params_of(model)
    placed = {p: v[...].sharding for p, v in nnx.to_flat_state(nnx.state(model))}
    with runtime.parked(model) as copy:
        assert all(x.is_deleted() for x in jax.tree.leaves(nnx.state(model)))
        assert params_of(copy).keys() == before.keys()
        for name, value in params_of(copy).items():
            np.testing.assert_array_equal(value, before[name], err_msg=name)
    for path, v in nnx.to_flat_state(nnx.state(model)):
        assert v[...].sharding == placed[path]
    for name, value in params_of(model).items():
        np.testing.assert_array_equal(value, before[name], err_msg=name)
