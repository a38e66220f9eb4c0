"""GGUF for every family: tiny random HF models written as llama.cpp's converter would, loaded back.

Each family of `hf_models` is converted to a float32 GGUF with `gguf.GGUFWriter` (tensor names from
gguf-py's own HF→GGUF table, the metadata `convert_hf_to_gguf.py` writes for that architecture, a
tiny byte-level vocabulary), then `models.from_pretrained(path)` must give the original model's
logits. Where transformers' own GGUF loading reads the file faithfully its logits are checked too;
where it does not, the original HF model is the only reference, for the reason in `_TRANSFORMERS`:

* qwen3: transformers does not read `attention.key_length`, so a head_dim other than Qwen3Config's
  default (128; here 24) loads with the wrong shapes.
* phi2: transformers has no `phi2` GGUF architecture.
* phi3 (longrope, phi4-mini's partial rotary): transformers drops the `rope_factors_long/short`
  tensors and `rope.dimension_count`, so its model rotates with plain rope over whole heads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import hf_models
from jaxsft import models, tokenization
from jaxsft.models import ModelConfig
from jaxsft.models.gguf import GGUFSource

# hf_models family -> llama.cpp architecture
FAMILIES = {
    "llama3.2-tied": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi2": "phi2",
    "phi3-longrope": "phi3",
    "phi4-mini": "phi3",
}
# families whose GGUF transformers cannot load faithfully (module docstring)
_TRANSFORMERS = {
    "qwen3": "head_dim 24 is not read from attention.key_length",
    "phi2": "no phi2 GGUF support",
    "phi3-longrope": "longrope factors dropped",
    "phi4-mini": "partial rotary and longrope factors dropped",
}
_PRE_TOKENIZER = {"llama": "llama-bpe", "qwen2": "qwen2", "qwen3": "qwen2", "phi2": "gpt-4o", "phi3": "gpt-4o"}


def _vocab(size: int) -> tuple[list[str], list[int], list[str]]:
    """A byte-level BPE vocabulary of `size` tokens: the specials of the tiny configs (ids 0-3:
    pad, bos, eos, unk), single characters, two merges, then llama.cpp's `[PAD<i>]` fillers."""
    space = "\u0120"  # byte-level BPE's spelling of " "
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789?.,'-") + [space]
    merged = ["he", space + "t"]
    tokens = ["<pad>", "<s>", "</s>", "<unk>", *chars, *merged]
    types = [gguf.TokenType.CONTROL] * 4 + [gguf.TokenType.NORMAL] * (len(tokens) - 4)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), size)]
    types += [gguf.TokenType.UNUSED] * (size - len(types))
    return tokens, types, ["h e", f"{space} t"]


def convert(model_dir: Path, out: Path, arch: str, *, fused_qkv: bool = False) -> None:
    """Write `model_dir` (HF safetensors) as `out`, float32, as llama.cpp's convert_hf_to_gguf.py.
    `fused_qkv`: one attn_qkv per layer, as phi-2 GGUFs converted from microsoft's original layout
    (`mixer.Wqkv`) carry."""
    hp = json.loads((model_dir / "config.json").read_text())
    rope = hp.get("rope_parameters") or {}
    hidden, heads, layers = hp["hidden_size"], hp["num_attention_heads"], hp["num_hidden_layers"]
    rotary = int(rope.get("partial_rotary_factor", 1.0) * hidden) // heads
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_block_count(layers)
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hidden)
    writer.add_head_count(heads)
    if arch == "phi2":  # Phi2Model.set_gguf_parameters
        writer.add_feed_forward_length(4 * hidden)
        writer.add_head_count_kv(heads)
        writer.add_layer_norm_eps(hp["layer_norm_eps"])
        writer.add_rope_dimension_count(rotary)
        writer.add_add_bos_token(False)
    else:  # TextModel.set_gguf_parameters
        writer.add_feed_forward_length(hp["intermediate_size"])
        writer.add_head_count_kv(hp["num_key_value_heads"])
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if arch in ("llama", "qwen2", "qwen3") and "head_dim" in hp:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    if arch == "llama":  # LlamaModel.set_gguf_parameters
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_rope_dimension_count(hp.get("head_dim") or hidden // heads)
    extra: dict[str, np.ndarray] = {}
    if arch == "phi3":  # Phi3MiniModel.set_gguf_parameters / generate_extra_tensors
        original = rope["original_max_position_embeddings"]
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_dimension_count(rotary)
        writer.add_sliding_window(hp.get("sliding_window") or 0)
        if rope.get("long_factor"):
            scale = hp["max_position_embeddings"] / original
            writer.add_rope_scaling_attn_factors(float(np.sqrt(1 + np.log(scale) / np.log(original))))
            extra["rope_factors_long.weight"] = np.asarray(rope["long_factor"], np.float32)
            extra["rope_factors_short.weight"] = np.asarray(rope["short_factor"], np.float32)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    tokens, types, merges = _vocab(hp["vocab_size"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZER[arch])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(hp["bos_token_id"])
    writer.add_eos_token_id(hp["eos_token_id"])
    if hp.get("pad_token_id") is not None:
        writer.add_pad_token_id(hp["pad_token_id"])

    tensors = load_file(model_dir / "model.safetensors")
    if fused_qkv:
        for i in range(layers):
            for kind in ("weight", "bias"):
                parts = [tensors.pop(f"model.layers.{i}.self_attn.{n}_proj.{kind}") for n in "qkv"]
                extra[f"blk.{i}.attn_qkv.{kind}"] = np.concatenate(parts)
    names = gguf.get_tensor_name_map({v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], layers)
    for name, tensor in {**extra, **tensors}.items():
        gguf_name = name if name in extra else names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # LlamaModel.permute
            n = heads if "q_proj" in name else hp["num_key_value_heads"]
            tensor = tensor.reshape(n, 2, tensor.shape[0] // n // 2, -1).swapaxes(1, 2).reshape(tensor.shape)
        writer.add_tensor(gguf_name, np.ascontiguousarray(tensor, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@nnx.jit
def _forward(model, ids):
    return model(ids)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_family_matches_transformers(family, tmp_path):
    import torch
    import transformers

    original = hf_models.build(family, tmp_path / "hf")
    path = tmp_path / "gguf" / f"{family}.gguf"
    path.parent.mkdir()
    convert(tmp_path / "hf", path, FAMILIES[family])
    ids = np.random.default_rng(0).integers(1, 96, size=(2, hf_models.SEQ_LEN))
    expected = hf_models.torch_logits(original, ids)

    source = GGUFSource(path)
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    got, want = ModelConfig.from_hf(source.config), ModelConfig.from_hf(hf_config)
    assert got.replace(rope=want.rope) == want
    for field in ("short_factor", "long_factor"):  # float32 in the file
        np.testing.assert_allclose(getattr(got.rope, field) or (), getattr(want.rope, field) or (), rtol=1e-6)
    assert dataclasses.replace(got.rope, short_factor=want.rope.short_factor,
                               long_factor=want.rope.long_factor) == want.rope
    assert sorted(source.keys()) == sorted(load_file(tmp_path / "hf" / "model.safetensors"))

    ours = models.from_pretrained(path)
    logits = np.asarray(_forward(ours, jnp.asarray(ids)))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)

    text = "the cat? he is 42."
    if family not in _TRANSFORMERS:
        reference = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()
        np.testing.assert_allclose(logits, hf_models.torch_logits(reference, ids), atol=1e-4, rtol=0)
    if family != "phi2":  # the file's tokenizer section: ours reads it as transformers does
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        assert tokenization.load_tokenizer(path)(text).input_ids == tokenizer(text).input_ids

    # the GGUF's config.json is one transformers loads: a GGUF-loaded model exports as HF
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        models.save_pretrained(ours, tmp_path / "export"), attn_implementation="eager")
    np.testing.assert_allclose(hf_models.torch_logits(exported, ids), expected, atol=1e-4, rtol=0)


def test_phi2_fused_qkv(tmp_path):
    """A phi-2 GGUF with fused attn_qkv weight and bias: split into HF's q/k/v_proj by head counts."""
    original = hf_models.build("phi2", tmp_path / "hf")
    path = tmp_path / "phi2-fused.gguf"
    convert(tmp_path / "hf", path, "phi2", fused_qkv=True)
    source = GGUFSource(path)
    reference = load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(source.keys()) == sorted(reference)
    for name in ("model.layers.1.self_attn.k_proj.weight", "model.layers.1.self_attn.v_proj.bias"):
        assert source.shape(name) == reference[name].shape
        np.testing.assert_array_equal(source.read(name), reference[name])
    ids = np.random.default_rng(1).integers(1, 96, size=(2, hf_models.SEQ_LEN))
    logits = np.asarray(_forward(models.from_pretrained(path), jnp.asarray(ids)))
    np.testing.assert_allclose(logits, hf_models.torch_logits(original, ids), atol=1e-4, rtol=0)
