"""Tiny random Hugging Face models of every family, built from configs (torch, CPU; tests only)."""

from __future__ import annotations

import pathlib

import numpy as np

_COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
_LONGROPE = dict(rope_type="longrope", original_max_position_embeddings=16)

# family name -> (transformers config class, kwargs)
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama2": ("LlamaConfig", dict(num_key_value_heads=4, rms_norm_eps=1e-5, rope_theta=10000.0)),
    "llama3.1": ("LlamaConfig", dict(
        num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8))),
    "llama3.2-tied": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0)),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=24, tie_word_embeddings=False)),
    "phi2": ("PhiConfig", dict(num_key_value_heads=4, partial_rotary_factor=0.5, hidden_act="gelu_new",
                               layer_norm_eps=1e-5, pad_token_id=0)),
    "phi3-longrope": ("Phi3Config", dict(
        num_key_value_heads=4, pad_token_id=0, original_max_position_embeddings=16,
        rope_scaling=dict(_LONGROPE, short_factor=[1.0 + 0.1 * k for k in range(8)],
                          long_factor=[2.0 + 0.5 * k for k in range(8)]))),
    "phi4-mini": ("Phi3Config", dict(
        num_key_value_heads=2, pad_token_id=0, partial_rotary_factor=0.75, tie_word_embeddings=True,
        original_max_position_embeddings=16,
        rope_scaling=dict(_LONGROPE, short_factor=[1.0 + 0.1 * k for k in range(6)],
                          long_factor=[2.0 + 0.5 * k for k in range(6)]))),
}
SEQ_LEN = 24  # longer than original_max_position_embeddings of the longrope configs


def build(family: str, directory: pathlib.Path, seed: int = 0, **overrides):
    """Save a random model of `family` to `directory`; return the torch model (eval, float32).
    `overrides` replace config fields (e.g. `vocab_size` to fit a real tokenizer)."""
    import torch
    import transformers

    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**_COMMON, **kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # random everything, norms and biases too, so every mapping is exercised
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(directory)
    return model


def torch_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.tensor(mask)}
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def char_tokenizer():
    """One token per character (ids 0-3: pad, bos, eos, unk, as in the tiny configs); BOS added by the
    post-processor; 76 ids, within the tiny vocab of 96."""
    from tokenizers import Tokenizer, decoders, models as tok_models, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 ?<|>.,'-"))
    tok = Tokenizer(tok_models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
