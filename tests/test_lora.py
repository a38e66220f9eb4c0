"""LoRA and QLoRA through qwix: merged model, PEFT adapter in torch, training, resume, AOT compile."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
from flax import nnx

import hf_models
from jaxsft import config as config_lib
from jaxsft import models
from jaxsft.models import sharding
from jaxsft.training import lora, train
from test_compile import TINY, compile_cli, needs_libtpu
from test_train import assert_params_equal, make_config, one_device, params_of, qa_set

IDS = np.random.default_rng(0).integers(4, 96, (2, hf_models.SEQ_LEN))
MASK = np.ones_like(IDS)
MASK[1, :5] = 0  # left padding on one row


def lora_config(rank: int = 4, alpha: float = 8.0, targets=None, quantize_base: bool = False):
    c = config_lib.default_config().train.lora
    c.update(rank=rank, alpha=alpha, quantize_base=quantize_base)
    if targets is not None:
        c.targets = targets
    return c


def randomize_adapters(model, seed: int = 0) -> None:
    """Non-zero A and B everywhere (a fresh adapter has B = 0 and changes nothing)."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, treedef.unflatten([0.2 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def logits(model) -> np.ndarray:
    return np.asarray(nnx.jit(lambda m, i, a: m(i, a))(model, jnp.asarray(IDS), jnp.asarray(MASK)))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """family -> (directory, torch model)"""
    built = {}

    def get(family: str):
        if family not in built:
            directory = tmp_path_factory.mktemp(family)
            built[family] = (directory, hf_models.build(family, directory))
        return built[family]

    return get


@pytest.mark.parametrize("family, scan, quantize_base", [
    ("llama3.1", True, False), ("phi2", False, False), ("phi3-longrope", True, False), ("qwen3", True, True)])
def test_merged_model_computes_what_the_adapted_one_does(hf_dirs, family, scan, quantize_base):
    directory, _ = hf_dirs(family)
    base = models.from_pretrained(directory, scan_layers=scan)
    c = lora_config(quantize_base=quantize_base,
                    targets=("q_proj", "v_proj", "o_proj", "up_proj", "down_proj") if family == "phi2" else None)
    adapted = lora.apply(base, c, seed=1)
    adapters = nnx.state(adapted, nnx.LoRAParam)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(adapters)}
    assert names == {f"layers.{t}.kernel_lora_{ab}" for t in c.targets for ab in "ab"}
    L, E = base.cfg.num_layers, base.cfg.hidden_size
    assert adapted.layers.q_proj.kernel_lora_a.shape == (L, E, 4)
    assert adapted.layers.q_proj.kernel_lora_a.get_metadata()["out_sharding"] == ("layers", "embed", None)
    if not quantize_base:  # a fresh adapter (B = 0) changes nothing
        np.testing.assert_array_equal(logits(adapted), logits(base))
    randomize_adapters(adapted)
    merged = lora.merge(adapted, c)
    assert type(merged.layers) is type(base.layers) and not nnx.state(merged, nnx.LoRAParam)
    np.testing.assert_allclose(logits(merged), logits(adapted), atol=1e-4, rtol=0)
    assert np.abs(logits(merged) - logits(base)).max() > 1e-2  # the adapters do something
    merged_params = params_of(merged)
    for name, value in params_of(base).items():  # what is not adapted is the base's, bit for bit
        if not any(name == f"layers.{t}.kernel" for t in c.targets):
            np.testing.assert_array_equal(merged_params[name], value, err_msg=name)


@pytest.mark.parametrize("family, targets", [
    ("llama2", None),
    ("qwen2", ("q_proj", "k_proj", "v_proj", "down_proj")),  # biases, tied embeddings
    ("phi2", ("q_proj", "o_proj", "up_proj", "down_proj")),  # dense, fc1, fc2
    ("phi3-longrope", None),  # fused qkv_proj and gate_up_proj: rank 3r and 2r
    ("phi4-mini", ("q_proj", "v_proj", "up_proj")),  # some parts of the fused modules
])
def test_peft_adapter_gives_the_same_logits_in_torch(hf_dirs, tmp_path, family, targets):
    import peft
    import transformers

    directory, _ = hf_dirs(family)
    c = lora_config(targets=targets)
    adapted = lora.apply(models.from_pretrained(directory), c, seed=2)
    randomize_adapters(adapted, seed=3)
    out = lora.save_adapter(adapted, c, tmp_path / "adapter", base_model=str(directory))
    config = json.loads((out / lora.ADAPTER_CONFIG).read_text())
    if family == "phi3-longrope":
        assert config["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
        assert config["rank_pattern"] == {"qkv_proj": 12, "gate_up_proj": 8}
    torch_base = transformers.AutoModelForCausalLM.from_pretrained(directory, attn_implementation="eager")
    without = hf_models.torch_logits(torch_base, IDS, MASK)[MASK == 1]
    peft_model = peft.PeftModel.from_pretrained(torch_base, out)
    loaded = {k for k in peft_model.state_dict() if "lora_" in k}
    assert len(loaded) == len(safetensors.numpy.load_file(out / lora.ADAPTER_WEIGHTS))  # every tensor used
    expected = logits(adapted)[MASK == 1]
    np.testing.assert_allclose(hf_models.torch_logits(peft_model.eval(), IDS, MASK)[MASK == 1], expected,
                               atol=1e-4, rtol=0)
    assert np.abs(without - expected).max() > 1e-2  # the adapters matter


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    hf_models.build("llama2", directory)
    hf_models.char_tokenizer().save_pretrained(directory)
    return directory


def lora_run_config(model_dir, **lora_fields):
    cfg = make_config(model_dir)
    cfg.train.lora.update(dict(rank=4, alpha=8.0, learning_rate=1e-2, targets=("q_proj", "v_proj", "down_proj")),
                          **lora_fields)
    return cfg


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """6 LoRA steps on one device, never stopped."""
    workdir = tmp_path_factory.mktemp("lora-reference")
    return train(lora_run_config(model_dir), workdir, qa_set(), mesh=one_device()), workdir


def checkpointed(step_dir: pathlib.Path) -> dict[str, tuple[int, ...]]:
    """Every array of the saved train state: name -> shape."""
    tree = ocp.StandardCheckpointer().metadata(step_dir / "state").item_metadata
    name = lambda path: ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path).removesuffix(".value")
    return {name(path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def adapter_of(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(workdir / "adapter" / lora.ADAPTER_WEIGHTS)


def test_only_the_adapters_train_and_are_checkpointed(model_dir, reference):
    result, workdir = reference
    losses = [h["loss"] for h in result.history]
    assert result.step == 6 and losses[-1] < 0.8 * losses[0], losses
    assert result.history[1]["learning_rate"] == pytest.approx(1e-2)  # train.lora.learning_rate
    # the checkpoint holds the adapters and their moments, nothing of the base
    saved = checkpointed(workdir / "checkpoints" / "6")
    adapters = {f"layers.{t}.kernel_lora_{ab}" for t in ("q_proj", "v_proj", "down_proj") for ab in "ab"}
    assert {k.removeprefix("params.") for k in saved if k.startswith("params.")} == adapters
    assert sum(np.prod(s) for s in saved.values()) < 4 * sum(np.prod(saved[f"params.{a}"]) for a in adapters)
    # the exported model is the base plus alpha / rank * A B on the targeted kernels, exactly the base elsewhere
    base, exported = params_of(models.from_pretrained(model_dir)), params_of(models.from_pretrained(workdir / "model"))
    adapter = adapter_of(workdir)
    assert exported.keys() == base.keys()
    for name, value in base.items():
        target = next((t for t in ("q_proj", "v_proj", "down_proj") if name == f"layers.{t}.kernel"), None)
        if target is None:
            np.testing.assert_array_equal(exported[name], value, err_msg=name)
            continue
        module = "mlp" if target == "down_proj" else "self_attn"
        for i in range(value.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{module}.{target}"
            delta = 2.0 * (adapter[f"{prefix}.lora_A.weight"].T @ adapter[f"{prefix}.lora_B.weight"].T)
            assert np.abs(delta).max() > 0, name  # B moved away from 0
            np.testing.assert_allclose(exported[name][i], value[i] + delta, atol=1e-6, err_msg=name)
    assert_params_equal(models.from_pretrained(workdir / "model"), result.model)


def test_resume_gives_bit_identical_adapters(model_dir, reference, tmp_path):
    cfg = lora_run_config(model_dir)
    first = train(cfg, tmp_path, qa_set(), mesh=one_device(), max_steps=4)  # stopped after 4 of 6 steps
    assert first.step == 4 and not (tmp_path / "adapter").exists()
    resumed = train(cfg, tmp_path, qa_set(), mesh=one_device())
    assert [h["step"] for h in resumed.history] == [4, 5]
    expected = adapter_of(reference[1])
    got = adapter_of(tmp_path)
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert_params_equal(resumed.model, reference[0].model)


def test_qlora_trains_sharded_adapters_over_an_nf4_base(model_dir, tmp_path):
    cfg = lora_run_config(model_dir, quantize_base=True, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"))
    cfg.train.epochs = 1
    result = train(cfg, tmp_path, qa_set(), mesh=sharding.make_mesh(1, 2, 2, devices=jax.devices()[:4]))
    losses = [h["loss"] for h in result.history]
    assert result.step == 3 and losses[-1] < losses[0], losses
    # the export is the NF4 base plus the adapters: close to, not equal to, the float32 base
    base, exported = params_of(models.from_pretrained(model_dir)), params_of(result.model)
    np.testing.assert_array_equal(exported["embed"], base["embed"])
    error = np.abs(exported["layers.q_proj.kernel"] - base["layers.q_proj.kernel"]).max()
    assert 0 < error < 0.3 * np.abs(base["layers.q_proj.kernel"]).max()
    assert (tmp_path / "adapter" / lora.ADAPTER_CONFIG).exists()


def test_demo_config_turns_lora_on_with_one_flag(model_dir, tmp_path):
    from absl import flags
    from ml_collections import config_flags

    argv = ["train", "--config=configs/demo.py", "--config.train.lora.rank=8"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    cfg = flag_values.config
    config_lib.validate(cfg)
    assert cfg.train.lora.rank == 8 and lora.enabled(cfg.train)
    cfg.model.path = str(model_dir)  # the tiny model instead of SmolLM2: the demo's train settings otherwise
    result = train(cfg, tmp_path, qa_set(), mesh=one_device(), max_steps=2)
    assert result.step == 2 and all(np.isfinite(h["loss"]) for h in result.history)
    assert all("kernel_lora_" in k for k in checkpointed(tmp_path / "checkpoints" / "2") if k.startswith("params."))
    with pytest.raises(ValueError, match="config.train.lora.targets"):
        cfg.train.lora.targets = ("q_proj", "lm_head")
        config_lib.validate(cfg)


@needs_libtpu
def test_lora_train_step_compiles_for_a_tpu_slice(tmp_path):
    proc, report = compile_cli(tmp_path, TINY, "--topology=v5e:2x2", "--steps=train", "--config.train.lora.rank=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_cost = report["steps"][0]
    assert report["fits"] and train_cost["flops"] > 0 and train_cost["aliased"] > 0
    assert "LoRA rank 4" in proc.stdout
