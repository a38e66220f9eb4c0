"""The real SmolLM2-135M-Instruct GGUF through our loader: logits as transformers, greedy answers;
and every error of the loader, each naming what is wrong."""

from __future__ import annotations

import json
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

import hf_models
from jaxsft import batching, generate, models, tokenization

PROMPTS = ["The capital of France is", "Question: Who wrote Hamlet?\nAnswer:", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    # Scanned layers compile one layer instead of 30 (loop and scan agree: tests/test_models.py).
    return models.from_pretrained(smollm2_gguf, scan_layers=True)


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    return tokenization.load_tokenizer(smollm2_gguf)


@nnx.jit
def _forward(model, ids, mask):
    return model(ids, mask)


def test_logits_match_transformers_gguf(smollm2, tokenizer, smollm2_gguf):
    import torch
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    assert smollm2.cfg.num_layers == 30 and smollm2.cfg.vocab_size == 49152
    rows = [[tokenizer.bos_token_id, *tokenizer.encode(p, add_special_tokens=False)] for p in PROMPTS]
    ids, mask = batching.pad(rows, max(map(len, rows)), left=False, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        expected = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(_forward(smollm2, jnp.asarray(ids), jnp.asarray(mask)))
    assert got.shape == expected.shape == (*ids.shape, 49152)
    for r, row in enumerate(rows):
        assert np.max(np.abs(got[r, :len(row)] - expected[r, :len(row)])) <= 1e-3, PROMPTS[r]


def test_greedy_capital_of_france(smollm2, tokenizer):
    stop = generate.stop_token_table(tokenizer, [tokenizer.eos_token_id])
    prompts = [tokenizer.encode(p, add_special_tokens=False) for p in ("The capital of France is", "1, 2, 3, 4,")]
    out = generate.generate(smollm2, prompts, stop_table=stop, max_new_tokens=6, buckets=(8,), batch_size=2,
                            pad_id=tokenizer.pad_token_id)
    france, count = (tokenizer.decode(o[0]) for o in out)
    assert france.split()[0].strip(".,") == "Paris", france
    assert count.split(",")[0].strip() == "5", count


# ------------------------------------------------------------------------------------------------
# Loader errors


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama2")
    hf_models.build("llama2", directory)
    return directory


def _copy(tiny_dir, tmp_path, edit_config=None, edit_tensors=None):
    directory = shutil.copytree(tiny_dir, tmp_path / "model")
    if edit_config:
        config = json.loads((directory / "config.json").read_text())
        edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(directory / "model.safetensors")
        edit_tensors(tensors)
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_unsupported_model_type_lists_supported(tiny_dir, tmp_path):
    directory = _copy(tiny_dir, tmp_path, edit_config=lambda c: c.update(model_type="gpt2"))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'") as err:
        models.from_pretrained(directory)
    assert all(name in str(err.value) for name in models.SUPPORTED_MODEL_TYPES)


def test_missing_and_unexpected_tensors_listed(tiny_dir, tmp_path):
    def edit(tensors):
        del tensors["model.layers.1.mlp.up_proj.weight"]
        del tensors["model.norm.weight"]
        tensors["model.layers.0.mlp.extra_proj.weight"] = np.zeros((2, 2), np.float32)

    directory = _copy(tiny_dir, tmp_path, edit_tensors=edit)
    with pytest.raises(ValueError) as err:
        models.from_pretrained(directory)
    message = str(err.value)
    assert "missing tensors: model.layers.1.mlp.up_proj.weight, model.norm.weight" in message
    assert "unexpected tensors: model.layers.0.mlp.extra_proj.weight" in message


def test_shape_mismatch_names_tensor_and_shapes(tiny_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    directory = _copy(tiny_dir, tmp_path, edit_tensors=lambda t: t.update({name: np.zeros((32, 64), np.float32)}))
    with pytest.raises(ValueError, match=rf"shape mismatch for {name}: expected \(64, 64\), found \(32, 64\)"):
        models.from_pretrained(directory)


def test_unreadable_files_name_their_path(tiny_dir, tmp_path):
    gguf_file = tmp_path / "broken.gguf"
    gguf_file.write_bytes(b"GGUF" + b"\x00" * 13)
    with pytest.raises(ValueError, match=str(gguf_file)):
        models.from_pretrained(gguf_file)
    directory = _copy(tiny_dir, tmp_path)
    (directory / "model.safetensors").write_bytes(b"\x05\x00not a header")
    with pytest.raises(ValueError, match=str(directory / "model.safetensors")):
        models.from_pretrained(directory)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        models.from_pretrained(tmp_path / "no-such-dir")


def test_hub_id_offline_fails_at_once():
    start = time.monotonic()
    with pytest.raises(OSError, match="jaxsft-tests/no-such-model"):
        models.from_pretrained("jaxsft-tests/no-such-model")
    assert time.monotonic() - start < 5
