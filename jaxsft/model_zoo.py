"""Architectures (HF `config.json` fields) of the paper's models, embedded so that shapes, memory and
compile checks need neither weights nor network.

Values are the public `config.json` of each hub id; only fields that `ModelConfig.from_hf` reads are kept.
"""

from __future__ import annotations

import json
from typing import Any

_LLAMA2 = dict(model_type="llama", vocab_size=32000, hidden_act="silu", max_position_embeddings=4096,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False,
               bos_token_id=1, eos_token_id=2)

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(  # the demo's model (the embedded GGUF's header)
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True, attention_bias=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "meta-llama/Llama-2-7b-hf": dict(
        _LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32),
    "meta-llama/Llama-2-13b-hf": dict(
        _LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
        num_key_value_heads=40),
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, hidden_act="silu", max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=128000, eos_token_id=128001),
    "Qwen/Qwen2-7B": dict(
        model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=131072,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, bos_token_id=151643,
        eos_token_id=151643),
    "microsoft/phi-2": dict(
        model_type="phi", vocab_size=51200, hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="gelu_new", max_position_embeddings=2048,
        layer_norm_eps=1e-5, partial_rotary_factor=0.4, rope_theta=10000.0, qk_layernorm=False,
        tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256),
    "microsoft/Phi-3-mini-4k-instruct": dict(
        model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=4096,
        original_max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
        sliding_window=2047, tie_word_embeddings=False, attention_bias=False, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000),
}


def hf_config(path: str) -> dict[str, Any]:
    """The HF config dict of a model path without reading weights: an embedded hub id, an HF directory
    (its `config.json`), a `.gguf` file (its header), or the embedded default model."""
    if path in ARCHITECTURES:
        return dict(ARCHITECTURES[path])
    from jaxsft.models import sources

    try:
        local = sources.locate(path).local
    except (FileNotFoundError, OSError, ValueError):
        local = None
    if local is not None and local.is_dir() and (local / "config.json").exists():
        return json.loads((local / "config.json").read_text())
    if local is not None and local.suffix == ".gguf":
        from jaxsft.models.gguf import gguf_hf_config

        return gguf_hf_config(local)
    raise ValueError(f"no architecture for model path {path!r}: not one of {sorted(ARCHITECTURES)}, "
                     "nor an HF directory with config.json, nor a .gguf file")
