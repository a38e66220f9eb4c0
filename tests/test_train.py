"""Fine-tuning a tiny random Llama with a character tokenizer: loss, masking, sharding, checkpoints."""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
from conftest import write_scores
from jaxsft import config as config_lib
from jaxsft.errors import UserError
from jaxsft import models, tokenization
from jaxsft.data.relations import ID_RELATIONS
from jaxsft.models import sharding
from jaxsft.models.config import ModelConfig
from jaxsft.training import data, optim, train
from jaxsft.training import step as step_lib
from jaxsft.training.step import loss_and_grads

NAMES = ["Ann", "Bob", "Cid", "Dan", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon"]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyiv"]
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # jax.monitoring event of each XLA compilation


def qa_set(n: int = 20) -> datasets.Dataset:
    return datasets.Dataset.from_dict({
        "question": [f"Where is {NAMES[i % 10]}{i // 10 or ''}?" for i in range(n)],
        "answers": [[CITIES[i % 5], "x"] for i in range(n)]})


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    hf_models.build("llama2", directory)
    hf_models.char_tokenizer().save_pretrained(directory)
    return directory


def make_config(model_dir: pathlib.Path, **train_fields):
    """20 items in batches of 8: 3 steps an epoch (the last one short), 2 epochs."""
    c = config_lib.default_config()
    c.model.path = str(model_dir)
    c.train.update(dict(learning_rate=3e-3, schedule="constant", warmup_steps=1, epochs=2, max_length=48,
                        checkpoint_every=2, keep_checkpoints=2, weight_decay=0.01), **train_fields)
    return c


def one_device():
    return sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])


def params_of(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_params_equal(got, expected, atol: float = 0.0) -> None:
    got, expected = params_of(got), params_of(expected)
    assert got.keys() == expected.keys()
    for name in expected:
        if atol:
            np.testing.assert_allclose(got[name], expected[name], atol=atol, rtol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """6 steps on one device, never stopped; and the names of the functions compiled meanwhile."""
    compiled = []

    def listener(event: str, seconds: float, **kwargs) -> None:
        if event == BACKEND_COMPILE:
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        workdir = tmp_path_factory.mktemp("reference")
        result = train(make_config(model_dir), workdir, qa_set(), mesh=one_device())
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return result, workdir, compiled


def test_loss_falls_compiles_once_and_exports(reference):
    result, workdir, compiled = reference
    assert (result.step, result.total_steps, result.preempted) == (6, 6, False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.7 * losses[0], losses
    assert compiled.count("jit(train_step)") == 1, compiled  # 6 steps, a short batch, 2 epochs: one compilation
    for h in result.history:
        assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu"} <= h.keys()
    assert [h["learning_rate"] for h in result.history[:2]] == [0.0, pytest.approx(3e-3)]  # warmup 1 step
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((workdir / "train_summary.json").read_text())
    assert summary["steps"] == 6 and summary["items"] == 20
    exported = models.from_pretrained(workdir / "model")
    assert_params_equal(exported, result.model)


def test_encoding_trains_on_the_first_answer_and_eos(model_dir):
    cfg = make_config(model_dir)
    tok = tokenization.load_tokenizer(model_dir)
    examples = data.encode(qa_set(3), tok, cfg)
    assert examples.input_ids.shape == (3, 48) and examples.report.total == 3
    for i, city in enumerate(CITIES[:3]):
        target = examples.input_ids[i][examples.loss_mask[i] == 1]
        assert tok.decode(target) == f" {city} </s>"
        assert examples.attention_mask[i].sum() == len(tok.decode(examples.input_ids[i], skip_special_tokens=True)) + 2
    cfg.train.update(max_length=20, truncation="refuse")
    with pytest.raises(tokenization.SequenceTooLongError, match="Where is Ann"):
        data.encode(qa_set(3), tok, cfg)


def test_gradient_ignores_masked_positions(model_dir):
    model = models.from_pretrained(model_dir)
    graphdef, params = nnx.split(model)
    cfg = make_config(model_dir)
    examples = data.encode(qa_set(6), tokenization.load_tokenizer(model_dir), cfg)  # 2 empty rows
    batch = {k: jnp.asarray(v) for k, v in data.batch(examples, 0, 8, seed=0).items()}
    grad = jax.jit(loss_and_grads, static_argnums=(1, 3))
    loss, grads = grad(params, graphdef, batch, 1)

    # the loss is the mean cross-entropy of the target tokens, predicted one position earlier
    logits = np.asarray(nnx.jit(lambda m, b: m(b["input_ids"], b["attention_mask"]))(model, batch), np.float64)
    ids, target = np.asarray(batch["input_ids"]), np.asarray(batch["loss_mask"]) == 1
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    b, t = np.nonzero(target[:, 1:])
    np.testing.assert_allclose(loss, -logp[b, t, ids[b, t + 1]].mean(), rtol=1e-5)

    # padding tokens (attention and loss masked) do not change the gradient, bit for bit
    rng = np.random.default_rng(0)
    noise = np.where(np.asarray(batch["attention_mask"]) == 0, rng.integers(3, 96, ids.shape), ids)
    assert (noise != ids).any()
    _, noisy = grad(params, graphdef, dict(batch, input_ids=jnp.asarray(noise, jnp.int32)), 1)
    for a, b_ in zip(jax.tree.leaves(grads), jax.tree.leaves(noisy)):
        np.testing.assert_array_equal(a, b_)

    # ... while the loss mask matters: training on the prompt too changes it
    _, prompt_too = grad(params, graphdef, dict(batch, loss_mask=batch["attention_mask"]), 1)
    assert not np.allclose(jax.tree.leaves(grads)[0], jax.tree.leaves(prompt_too)[0])

    # two microbatches give the gradient of the whole batch
    loss2, grads2 = grad(params, graphdef, batch, 2)
    np.testing.assert_allclose(loss2, loss, rtol=1e-6)
    for a, b_ in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2)):
        np.testing.assert_allclose(a, b_, atol=1e-7, rtol=1e-5)


def test_logits_at_target_positions_only_give_the_same_loss_and_grads(model_dir):
    graphdef, params = nnx.split(models.from_pretrained(model_dir))
    examples = data.encode(qa_set(6), tokenization.load_tokenizer(model_dir), make_config(model_dir))
    batch = {k: jnp.asarray(v) for k, v in data.batch(examples, 0, 8, seed=0).items()}
    k = step_lib.targets_per_row(examples.loss_mask)
    assert k < examples.loss_mask.shape[1] - 1  # fewer positions unembedded than the whole row
    grad = jax.jit(loss_and_grads, static_argnums=(1, 3, 5))
    for accum in (1, 2):
        loss, grads = grad(params, graphdef, batch, accum, (), None)
        loss_k, grads_k = grad(params, graphdef, batch, accum, (), k)
        np.testing.assert_allclose(loss_k, loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_k)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    most = int((examples.loss_mask[:, 1:] > 0).sum(-1).max())
    assert int(step_lib.dropped_targets(batch, most)) == 0 and int(step_lib.dropped_targets(batch, most - 1)) > 0


def test_remat_scan_and_bfloat16_options(model_dir):
    """Remat and scanned layers change memory, not gradients; bfloat16 compute keeps float32 master
    weights and gradients."""
    cfg = make_config(model_dir)
    examples = data.encode(qa_set(8), tokenization.load_tokenizer(model_dir), cfg)
    batch = {k: jnp.asarray(v) for k, v in data.batch(examples, 0, 8, seed=0).items()}

    def loss_grads(**options):
        graphdef, params = nnx.split(models.from_pretrained(model_dir, **options))
        return jax.jit(loss_and_grads, static_argnums=1)(params, graphdef, batch)

    loss, grads = loss_grads()
    loss_remat, grads_remat = loss_grads(remat="full", scan_layers=True)
    np.testing.assert_allclose(loss_remat, loss, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    loss_bf16, grads_bf16 = loss_grads(dtype=jnp.bfloat16, param_dtype=jnp.float32)
    assert {g.dtype for g in jax.tree.leaves(grads_bf16)} == {np.dtype(np.float32)}
    np.testing.assert_allclose(loss_bf16, loss, rtol=2e-2)


def test_weight_decay_skips_norms_and_biases():
    kwargs = hf_models.FAMILIES["phi2"][1]
    cfg = ModelConfig.from_hf(dict(hf_models._COMMON, model_type="phi", **kwargs))
    abstract = nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0)))
    mask = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(optim.decay_mask(nnx.state(abstract, nnx.Param)))}
    decayed = {k for k, v in mask.items() if v}
    assert decayed == {"embed", "lm_head", *(f"layers.{n}_proj.kernel" for n in ("q", "k", "v", "o", "up", "down"))}
    kept = mask.keys() - decayed
    assert {"layers.q_proj.bias", "layers.up_proj.bias", "lm_head_bias", "final_norm.bias", "layers.attn_norm.scale"} <= kept


def test_mu_dtype_stores_the_first_moment_in_bfloat16():
    cfg = ModelConfig.from_hf(dict(hf_models._COMMON, model_type="llama", **hf_models.FAMILIES["llama2"][1]))
    params = nnx.state(nnx.eval_shape(lambda: models.Decoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    t = config_lib.default_config().train

    def moments(mu_dtype):
        tx = optim.optimizer(_with(t, mu_dtype=mu_dtype))
        adam = jax.eval_shape(tx.init, params)[1][0]
        return {x.dtype for x in jax.tree.leaves(adam.mu)}, {x.dtype for x in jax.tree.leaves(adam.nu)}

    assert moments("") == ({np.dtype(np.float32)}, {np.dtype(np.float32)})
    assert moments("bfloat16") == ({jnp.dtype(jnp.bfloat16)}, {np.dtype(np.float32)})


def _with(config, **fields):
    config = config.copy_and_resolve_references()
    config.update(fields)
    return config


def test_batches_visit_every_item_once_per_epoch():
    n, size = 20, 8
    ids = np.arange(1, n + 1, dtype=np.int32)[:, None] * np.ones((1, 4), np.int32)
    examples = data.Examples(ids, np.ones_like(ids), np.ones_like(ids), tokenization.SFTReport(n, (), (), (), 4))
    epochs = []
    for epoch in range(2):
        rows = [data.batch(examples, epoch * 3 + i, size, seed=7)["input_ids"][:, 0] for i in range(3)]
        assert [len(r) for r in rows] == [8, 8, 8] and (rows[-1][4:] == 0).all()  # a short batch, padded
        seen = np.concatenate(rows)
        epochs.append(seen[seen > 0])
        assert sorted(epochs[-1]) == list(range(1, n + 1))
    assert (epochs[0] != epochs[1]).any()
    again = data.batch(examples, 4, size, seed=7)["input_ids"][:, 0]
    np.testing.assert_array_equal(again, epochs[1][8:16])
    assert data.position(examples, 4, size, 7)["epoch"] == 1


def test_sharded_training_matches_one_device(model_dir, reference, tmp_path):
    """data=2 x fsdp=2 x tensor=2 on 8 fake devices, with 2 microbatches, against one device."""
    result = train(make_config(model_dir, grad_accum=2), tmp_path, qa_set(), mesh=sharding.make_mesh(2, 2, 2))
    assert len(result.model.layers.q_proj.kernel[...].sharding.device_set) == 8
    assert_params_equal(result.model, reference[0].model, atol=1e-5)


def test_resume_is_bit_identical(model_dir, reference, tmp_path, monkeypatch):
    cfg = make_config(model_dir)
    first = train(cfg, tmp_path, qa_set(), mesh=one_device(), max_steps=3)  # stopped after 3 steps
    assert first.step == 3 and sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [2, 3]

    real_batch = data.batch

    def crash_at_5(examples, step, *args):
        if step == 5:
            raise KeyboardInterrupt("killed")
        return real_batch(examples, step, *args)

    monkeypatch.setattr(data, "batch", crash_at_5)
    with pytest.raises(KeyboardInterrupt):  # a crash after step 4 was checkpointed and step 5 ran
        train(cfg, tmp_path, qa_set(), mesh=one_device())
    monkeypatch.undo()
    resumed = train(cfg, tmp_path, qa_set(), mesh=one_device())
    assert [h["step"] for h in resumed.history] == [4, 5]
    assert_params_equal(resumed.model, reference[0].model)


def test_corrupt_latest_checkpoint_falls_back(model_dir, reference, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(reference[1], workdir)
    latest = workdir / "checkpoints" / "6"
    for f in (latest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        resumed = train(make_config(model_dir), workdir, qa_set(), mesh=one_device())
    assert any(str(latest) in r.getMessage() and "cannot be read" in r.getMessage() for r in caplog.records)
    assert (workdir / "checkpoints.unreadable" / "6").is_dir()
    assert [h["step"] for h in resumed.history] == [4, 5]
    assert_params_equal(resumed.model, reference[0].model)


def test_unreadable_checkpoints_never_restart_silently(model_dir, tmp_path):
    cfg = make_config(model_dir, epochs=1, checkpoint_every=0)
    train(cfg, tmp_path, qa_set(), mesh=one_device(), max_steps=1)
    shutil.rmtree(tmp_path / "checkpoints" / "1" / "state")
    with pytest.raises(UserError, match="refusing to start from scratch"):
        train(cfg, tmp_path, qa_set(), mesh=one_device())


def test_restore_onto_another_mesh(model_dir, reference, tmp_path):
    cfg = make_config(model_dir)
    train(cfg, tmp_path, qa_set(), mesh=one_device(), max_steps=2)
    resumed = train(cfg, tmp_path, qa_set(), mesh=sharding.make_mesh(1, 4, 2))
    assert [h["step"] for h in resumed.history] == [2, 3, 4, 5]
    assert len(resumed.model.embed[...].sharding.device_set) == 8
    assert_params_equal(resumed.model, reference[0].model, atol=1e-5)


def test_sigterm_saves_a_checkpoint_and_exits_zero(model_dir, tmp_path):
    """`python -m jaxsft.train` on scored facts, killed with SIGTERM mid-run."""
    rows = [dict(id=f"{r}-{i}", split="train", relation=r, subject=n, question=f"Where is {n}?",
                 answers=[CITIES[i % 5]], templates=[0.5], R=0.5, level=0)
            for r in ID_RELATIONS for i, n in enumerate(NAMES[:3])]
    write_scores(tmp_path, rows, shards=1)
    config = tmp_path / "config.py"
    config.write_text(textwrap.dedent(f"""
        from jaxsft import config
        def get_config():
            c = config.default_config()
            c.model.path = {str(model_dir)!r}
            c.mesh.fsdp = 1
            c.select.size = "all"
            c.train.update(epochs=10000, max_length=48, checkpoint_every=0)
            return c
    """))
    run = tmp_path / "sft" / "level0-sizeall-seed0"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    log = tmp_path / "stderr.txt"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "jaxsft.train", f"--config={config}", f"--workdir={tmp_path}"],
                                env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not list((run / "tensorboard").glob("events.*")):  # the writer opens just before step 0
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = log.read_text()
    assert proc.returncode == 0, err
    steps = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(steps) == 1 and 0 < steps[0] < 4 * 10000, steps
    position = json.loads((run / "checkpoints" / str(steps[0]) / "data" / "metadata").read_text())
    assert position["step"] == steps[0] and position["num_items"] == 30
    assert f"SIGTERM: saved a checkpoint at step {steps[0]}" in err
    assert not (run / "model").exists()


def test_divergence_stops_the_run_naming_the_step(model_dir, tmp_path):
    cfg = make_config(model_dir, learning_rate=1e30, warmup_steps=0, checkpoint_every=1)
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d"):
        train(cfg, tmp_path, qa_set(), mesh=one_device())
    assert not (tmp_path / "model").exists()
