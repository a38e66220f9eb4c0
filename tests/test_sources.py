"""Tensor sources: safetensors round trips and errors; GGUF against transformers' own GGUF loading."""

import functools
import json
import tracemalloc
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

from jaxsft.models import gguf as jgguf
from jaxsft.models.gguf import GGUFSource, gguf_hf_config
from jaxsft.models.sources import SafetensorsSource, TensorSource, open_source

Q = gguf.GGMLQuantizationType


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "model.embed_tokens.weight": rng.standard_normal((16, 8), np.float32),
        "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(ml_dtypes.bfloat16),
        "model.layers.0.mlp.up_proj.weight": rng.standard_normal((12, 8)).astype(np.float16),
        "model.norm.weight": rng.standard_normal(8).astype(ml_dtypes.bfloat16),
        "position_ids": np.arange(10, dtype=np.int64)[None],
    }


def _assert_roundtrip(source: SafetensorsSource, tensors: dict[str, np.ndarray]) -> None:
    assert isinstance(source, TensorSource)
    assert sorted(source.keys()) == sorted(tensors)
    for name, expected in tensors.items():
        assert source.shape(name) == expected.shape
        got = source.read(name)
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected)
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    for index in [(slice(2, 6), slice(None)), (slice(None), slice(4, 8)), (3, slice(1, 5)), slice(0, 1)]:
        np.testing.assert_array_equal(source.read_slice("model.layers.0.self_attn.q_proj.weight", index), q[index])


def _write_sharded(directory: Path, tensors: dict[str, np.ndarray]) -> dict[str, str]:
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, directory / shard)
        weight_map.update(dict.fromkeys(keys, shard))
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return weight_map


def test_safetensors_single_file_roundtrip(tmp_path):
    tensors = _tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    _assert_roundtrip(SafetensorsSource(tmp_path), tensors)
    _assert_roundtrip(SafetensorsSource(tmp_path / "model.safetensors"), tensors)
    config, source = open_source(tmp_path)
    assert config == {"model_type": "llama", "hidden_size": 8}
    assert isinstance(source, SafetensorsSource) and source.path == str(tmp_path)
    assert source.read("model.norm.weight").dtype == ml_dtypes.bfloat16


def test_safetensors_sharded_roundtrip(tmp_path):
    tensors = _tensors(1)
    weight_map = _write_sharded(tmp_path, tensors)
    source = SafetensorsSource(tmp_path)
    assert source.keys() == list(weight_map)
    assert [p.name for p in source.files] == sorted(set(weight_map.values()))
    _assert_roundtrip(source, tensors)
    with pytest.raises(KeyError, match="no tensor 'missing'"):
        source.read("missing")


def test_read_slice_loads_device_shards(tmp_path):
    """`read_slice` takes the index tuples jax hands to `make_array_from_callback`."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    tensors = _tensors(2)
    _write_sharded(tmp_path, tensors)
    source = SafetensorsSource(tmp_path)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"))
    for name, spec in [("model.embed_tokens.weight", P("fsdp", "tensor")), ("model.norm.weight", P())]:
        sharding = NamedSharding(mesh, spec)
        read = functools.partial(source.read_slice, name)
        array = jax.make_array_from_callback(source.shape(name), sharding, read)
        assert array.dtype == tensors[name].dtype and len(array.addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(array), tensors[name])


def test_corrupt_safetensors_names_the_file(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=f"cannot read safetensors file {tmp_path / 'model.safetensors'}"):
        SafetensorsSource(tmp_path)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    save_file(_tensors(), truncated / "model.safetensors")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(truncated / "model.safetensors")):
        SafetensorsSource(truncated)


def test_sharded_errors_name_the_shard(tmp_path):
    tensors = _tensors()
    weight_map = _write_sharded(tmp_path, tensors)
    second = tmp_path / "model-00002-of-00002.safetensors"

    second.write_bytes(b"garbage")
    source = SafetensorsSource(tmp_path)  # shards are opened on first use
    np.testing.assert_array_equal(source.read("model.embed_tokens.weight"), tensors["model.embed_tokens.weight"])
    late = next(k for k, shard in weight_map.items() if shard == second.name)
    with pytest.raises(ValueError, match=f"cannot read safetensors file {second}"):
        source.read(late)

    second.unlink()
    with pytest.raises(FileNotFoundError, match=f"shard {second} listed in .*index.json is missing"):
        SafetensorsSource(tmp_path)

    save_file({late: tensors[late]}, second)  # the index lists tensors this shard lacks
    with pytest.raises(KeyError, match=f"listed in the index but missing from {second}"):
        SafetensorsSource(tmp_path).read(next(k for k in weight_map if k != late and weight_map[k] == second.name))


def test_open_source_errors(tmp_path):
    save_file(_tensors(), tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=f"no config.json in model directory {tmp_path}"):
        open_source(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"cannot parse {tmp_path / 'config.json'}"):
        open_source(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model path"):
        open_source(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"no model.safetensors or model.safetensors.index.json in {empty}"):
        SafetensorsSource(empty)


# --- GGUF: the real SmolLM2-135M-Instruct Q4_1 file --------------------------------------------


@pytest.fixture(scope="module")
def smollm2_source(smollm2_gguf) -> GGUFSource:
    return GGUFSource(smollm2_gguf)


@pytest.fixture(scope="module")
def transformers_gguf(smollm2_gguf):
    """(config, float32 state dict) as transformers loads the same file (LlamaTensorProcessor)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(smollm2_gguf, return_tensors=True, model_to_load=model)["tensors"]
    return config, {name: t.numpy() for name, t in tensors.items()}


def test_gguf_tensors_match_transformers(smollm2_source, transformers_gguf):
    config, reference = transformers_gguf
    assert config.tie_word_embeddings and "lm_head.weight" not in smollm2_source.keys()
    assert set(smollm2_source.keys()) == set(reference) - {"lm_head.weight"}
    assert len(smollm2_source.keys()) == 2 + 9 * config.num_hidden_layers
    for name in smollm2_source.keys():
        ours = smollm2_source.read(name)
        assert ours.dtype == np.float32 and ours.shape == reference[name].shape == smollm2_source.shape(name), name
        assert np.max(np.abs(ours - reference[name])) <= 1e-6, name
    assert smollm2_source.shape("model.layers.0.self_attn.q_proj.weight") == (576, 576)
    assert smollm2_source.shape("model.layers.0.self_attn.k_proj.weight") == (192, 576)
    assert smollm2_source.shape("model.layers.0.mlp.down_proj.weight") == (576, 1536)


def test_gguf_config_matches_transformers(smollm2_source, transformers_gguf):
    reference, _ = transformers_gguf
    ours = smollm2_source.config
    for key in ["model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id"]:
        assert ours[key] == getattr(reference, key), key
    assert ours["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert ours["rope_theta"] == reference.rope_parameters["rope_theta"]
    # float32 metadata comes back at the decimal the converter wrote, as in the original config.json
    assert (ours["vocab_size"], ours["rms_norm_eps"], ours["rope_theta"]) == (49152, 1e-5, 100000.0)
    assert ours["tie_word_embeddings"] is True and "rope_scaling" not in ours


def test_gguf_read_holds_one_tensor(smollm2_source):
    """Dequantising the largest tensor (Q8_0 embedding) needs little beyond its own float32 output."""
    name = "model.embed_tokens.weight"
    tracemalloc.start()
    try:
        out = smollm2_source.read(name)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.nbytes == 49152 * 576 * 4
    assert peak - out.nbytes < 32 * 2**20, peak / 2**20


# --- GGUF: synthetic files ----------------------------------------------------------------------

HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, VOCAB = 4, 2, 32, 256, 96, 40


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: HF rotary halves → llama.cpp interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _q4_k_bytes(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_K blocks with finite fp16 scales (gguf-py cannot quantise to Q4_K)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[Q.Q4_K]
    blocks = rng.integers(0, 256, (rows, cols // block_size, type_size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, (rows, cols // block_size, 2)).astype(np.float16)
    blocks[..., :4] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def _write_llama_gguf(path: Path, *, tied: bool, extra: dict[str, np.ndarray] | None = None):
    """A one-layer llama GGUF as llama.cpp writes it; returns HF-layout float32 originals and the
    GGUF (name, quantisation) of each."""
    rng = np.random.default_rng(0)
    hf = {
        "token_embd": rng.standard_normal((VOCAB, HIDDEN), np.float32),
        "blk.0.attn_q": rng.standard_normal((HEADS * HEAD_DIM, HIDDEN), np.float32),
        "blk.0.attn_k": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN), np.float32),
        "blk.0.attn_v": rng.standard_normal((KV_HEADS * HEAD_DIM, HIDDEN), np.float32),
        "blk.0.attn_output": rng.standard_normal((HIDDEN, HEADS * HEAD_DIM), np.float32),
        "blk.0.ffn_gate": rng.standard_normal((FFN, HIDDEN), np.float32),
        "blk.0.ffn_up": rng.standard_normal((FFN, HIDDEN), np.float32),
        "blk.0.ffn_down": rng.standard_normal((HIDDEN, FFN), np.float32),
        "blk.0.attn_norm": rng.standard_normal(HIDDEN, np.float32),
        "blk.0.ffn_norm": rng.standard_normal(HIDDEN, np.float32),
        "output_norm": rng.standard_normal(HIDDEN, np.float32),
    }
    if not tied:
        hf["output"] = rng.standard_normal((VOCAB, HIDDEN), np.float32)
    types = {"token_embd": Q.Q8_0, "blk.0.attn_q": Q.F32, "blk.0.attn_k": Q.Q4_K, "blk.0.attn_v": Q.F16,
             "blk.0.attn_output": Q.BF16, "blk.0.ffn_gate": Q.Q4_1, "blk.0.ffn_up": Q.F32,
             "blk.0.ffn_down": Q.Q8_0, "output": Q.F16}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(2048)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(1)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(4.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_bos_token_id(7)
    writer.add_eos_token_id(9)
    for stem, w in hf.items():
        if stem in ("blk.0.attn_q", "blk.0.attn_k"):
            w = _llama_cpp_permute(w, HEADS if stem == "blk.0.attn_q" else KV_HEADS)
        qtype = types.get(stem, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(f"{stem}.weight", w)
        elif qtype == Q.F16:
            writer.add_tensor(f"{stem}.weight", w.astype(np.float16))
        elif qtype == Q.Q4_K:
            writer.add_tensor(f"{stem}.weight", _q4_k_bytes(rng, *w.shape), raw_dtype=qtype)
        else:
            writer.add_tensor(f"{stem}.weight", quantize(w, qtype), raw_dtype=qtype)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return hf, types


HF_NAMES = {
    "token_embd": "model.embed_tokens.weight",
    "blk.0.attn_q": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down": "model.layers.0.mlp.down_proj.weight",
    "blk.0.attn_norm": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm": "model.layers.0.post_attention_layernorm.weight",
    "output_norm": "model.norm.weight",
    "output": "lm_head.weight",
}


@pytest.mark.parametrize("chunk", [jgguf._CHUNK_ELEMENTS, 3 * HIDDEN])
def test_synthetic_llama_gguf(tmp_path, monkeypatch, chunk):
    """Every quantisation type, q/k unpermuted, untied head, rope scaling; chunked dequantisation."""
    monkeypatch.setattr(jgguf, "_CHUNK_ELEMENTS", chunk)
    path = tmp_path / "tiny.gguf"
    hf, types = _write_llama_gguf(path, tied=False)
    config, source = open_source(path)
    assert isinstance(source, GGUFSource) and isinstance(source, TensorSource) and source.path == str(path)
    assert config == {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
        "max_position_embeddings": 2048, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": 1, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "rms_norm_eps": 1e-6, "head_dim": HEAD_DIM, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "bos_token_id": 7, "eos_token_id": 9,
        "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float32", "dtype": "float32",
    }
    assert gguf_hf_config(path) == config
    assert sorted(source.keys()) == sorted(HF_NAMES[stem] for stem in hf)

    reader = gguf.GGUFReader(path)
    for stem, original in hf.items():
        name, qtype = HF_NAMES[stem], types.get(stem, Q.F32)
        got = source.read(name)
        assert got.dtype == np.float32 and got.shape == original.shape == source.shape(name), name
        stored = next(t for t in reader.tensors if t.name == f"{stem}.weight")
        assert stored.tensor_type == qtype, name
        if qtype == Q.Q4_K:  # random blocks: compare with the whole-tensor dequantisation, unpermuted
            full = dequantize(stored.data, qtype)
            expected = full.reshape(KV_HEADS, HEAD_DIM // 2, 2, HIDDEN).swapaxes(1, 2).reshape(full.shape)
            np.testing.assert_array_equal(got, expected)
        elif qtype in (Q.F32, Q.F16, Q.BF16):
            cast = {Q.F32: np.float32, Q.F16: np.float16, Q.BF16: ml_dtypes.bfloat16}[qtype]
            np.testing.assert_array_equal(got, original.astype(cast).astype(np.float32))
        else:
            np.testing.assert_allclose(got, original, atol=0.2 * np.abs(original).max())
            roundtrip = dequantize(quantize(original, qtype), qtype)  # unpermuted tensors: exact
            np.testing.assert_array_equal(got, roundtrip)


def test_gguf_permutation_matches_transformers_processor(tmp_path):
    """Our row order equals transformers' LlamaTensorProcessor on the synthetic q/k tensors."""
    pytest.importorskip("torch")
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    path = tmp_path / "tiny.gguf"
    _write_llama_gguf(path, tied=True)
    source = GGUFSource(path)
    assert source.config["tie_word_embeddings"] is True and "lm_head.weight" not in source.keys()
    processor = LlamaTensorProcessor(config={"num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS})
    for tensor in source.reader.tensors:
        if tensor.name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            reference = processor.process(dequantize(tensor.data, tensor.tensor_type), tensor.name).weights
            hf_name = HF_NAMES[tensor.name.removesuffix(".weight")]
            np.testing.assert_array_equal(source.read(hf_name), reference)


def test_gguf_unmapped_tensors(tmp_path):
    rope_freqs = np.ones(HEAD_DIM // 2, np.float32)
    _write_llama_gguf(tmp_path / "freqs.gguf", tied=True, extra={"rope_freqs.weight": rope_freqs})
    with pytest.warns(UserWarning, match="rope_freqs.weight: llama.cpp's per-dimension rope frequency"):
        source = GGUFSource(tmp_path / "freqs.gguf")
    assert not any("rope_freqs" in k for k in source.keys())

    _write_llama_gguf(tmp_path / "odd.gguf", tied=True, extra={"blk.0.attn_sinks.weight": rope_freqs})
    with pytest.raises(ValueError, match="'blk.0.attn_sinks.weight' has no Hugging Face counterpart"):
        GGUFSource(tmp_path / "odd.gguf")


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = f"unsupported GGUF architecture 'mamba' in {path}; supported: llama, phi2, phi3, qwen2, qwen3"
    with pytest.raises(ValueError, match=message):
        GGUFSource(path)
    with pytest.raises(ValueError, match=message):
        open_source(path)


def test_unreadable_gguf_names_the_file(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match=f"cannot read GGUF file {path}"):
        GGUFSource(path)
