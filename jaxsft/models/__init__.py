"""Flax NNX ports of Llama, Qwen and Phi: one decoder, loaded from HF safetensors or GGUF."""

from jaxsft.models.config import SUPPORTED_MODEL_TYPES, ModelConfig
from jaxsft.models.decoder import Decoder, KVCache
from jaxsft.models.loading import from_pretrained, save_pretrained

__all__ = ["SUPPORTED_MODEL_TYPES", "Decoder", "KVCache", "ModelConfig", "from_pretrained", "save_pretrained"]
