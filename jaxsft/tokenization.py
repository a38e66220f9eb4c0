"""Tokenizers: loading, BOS/EOS, and where a continuation's tokens start.

Everything here encodes ``prompt + continuation`` as ONE string and finds the continuation's tokens
by character offsets, so the ids scored or trained on are exactly the ids the model reads for the
whole text, not the concatenation of two separate tokenisations.

Conventions
-----------
* Special tokens: text is always encoded with ``add_special_tokens=False``; BOS and EOS are added as
  ids (see `special_tokens`). Added tokens inside the text are matched as the tokenizer defines them:
  ``"<|question|>"`` is plain text unless the tokenizer has it as a token.
* Boundary: with ``b = len(prompt)``, a token belongs to the continuation iff its character span
  ends after ``b`` or starts at or after ``b``. A continuation that starts with its own space
  (``" Paris"``) is clean with both byte-level BPE (``"ĠParis"``) and SentencePiece (``"▁Paris"``):
  both tokens start at the space, which is the continuation's first character.
* Straddling token: if the first continuation token starts before ``b`` (``"of " + "France"`` gives
  ``" France"``; ``"Fran" + "ce"`` may give ``"France"``), the boundary moves to that token's start.
  The token is scored/trained (the model has to emit it to produce the continuation), and
  `Continuation.overlap` (``b`` minus the token's start) says how many prompt characters it covers.
* Decoding: byte-level BPE decodes ``ids[start:]`` to the continuation exactly. HF's SentencePiece
  decoders strip one leading space from the decoded text, so there ``decode(ids[start:])`` is the
  continuation without its leading space (the ids themselves do contain ``"▁"``).
* SFT (`encode_sft`): prompt and target are one text split the same way, so the trained tokens are
  exactly the scored ones. When the prompt ends at a word boundary (the paper's ``" <|answer|>"``
  does, and the target starts with a space) its tokens are also those of the prompt alone, i.e.
  what the model reads before generating; `SFTReport.straddled` lists items split inside a token.
  The paper's target ``" " + answer + " "`` ends in a space: its own token (``"Ġ"``, ``"▁"``) just
  before EOS.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import pathlib
import re
import struct
import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

import numpy as np
import transformers
from tokenizers import Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from jaxsft.errors import UserError

__all__ = [
    "Continuation",
    "PAPER_TEMPLATE",
    "SFTReport",
    "SFTTemplate",
    "SequenceTooLongError",
    "check_vocab",
    "encode_continuation",
    "encode_continuations",
    "encode_sft",
    "encode_sft_batch",
    "gguf_metadata",
    "load_tokenizer",
    "special_tokens",
]

Truncation = Literal["refuse", "left", "skip"]

# Files that make up a tokenizer in an HF repository (all a hub download needs).
_TOKENIZER_FILES = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "*.tiktoken",
]
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


# ---------------------------------------------------------------------------------------- loading


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """A fast (offset-tracking) tokenizer from an HF directory, a ``.gguf`` file or a hub id.

    Directories with a ``tokenizer.json`` load it verbatim; otherwise the ``tokenizer_class`` of
    ``tokenizer_config.json`` converts what is there (``tokenizer.model``, vocab/merges). A GGUF is
    read from its metadata without torch. A hub id is fetched (tokenizer files only) unless
    ``HF_HUB_OFFLINE`` is set, in which case only a cached copy is used and its absence is an error.
    """
    p = pathlib.Path(path)
    if p.is_file():
        if p.suffix == ".gguf":
            return _load_gguf(p)
        if p.name == "tokenizer.json":
            return _load_dir(p.parent)
        raise UserError(f"{p}: expected a directory, a tokenizer.json or a .gguf file")
    if p.is_dir():
        return _load_dir(p)
    name = os.fspath(path)
    if not _HUB_ID.match(name) or name.startswith("."):
        raise FileNotFoundError(f"{name}: no such file or directory (and not a hub id)")
    return _load_hub(name)


def _load_dir(directory: pathlib.Path) -> PreTrainedTokenizerFast:
    if (directory / "tokenizer.json").is_file():
        tok = PreTrainedTokenizerFast.from_pretrained(directory)
    else:
        config_file = directory / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        name = config.get("tokenizer_class")
        cls = getattr(transformers, name, None) if name else None
        if not (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerFast)):
            raise UserError(
                f"{directory}: no tokenizer.json, and tokenizer_config.json names no fast tokenizer "
                f"class to convert the files with (tokenizer_class={name!r})"
            )
        tok = cls.from_pretrained(directory)
    if not tok.is_fast:
        raise TypeError(f"{directory}: loaded a slow tokenizer; character offsets need a fast one")
    return tok


def _load_hub(repo_id: str) -> PreTrainedTokenizerFast:
    from huggingface_hub import constants, snapshot_download

    offline = constants.is_offline_mode()
    try:
        local = snapshot_download(repo_id, allow_patterns=_TOKENIZER_FILES, local_files_only=offline)
    except Exception as e:  # the hub raises many types: missing repo, no network, offline cache miss
        where = "the hub is offline (HF_HUB_OFFLINE) and there is no cached copy" if offline else str(e)
        raise OSError(f"{repo_id!r} is not a local path and cannot be fetched: {where}") from e
    return _load_dir(pathlib.Path(local))


# llama.cpp pre-tokenizer names whose HF tokenizer.json splits digits one by one before the GPT-2
# byte-level regex, and which transformers' GGUF table does not cover.
_DIGIT_SPLIT_PRE = ("smollm", "starcoder")
_GGUF_SPECIALS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def _load_gguf(path: pathlib.Path) -> PreTrainedTokenizerFast:
    """Rebuild the tokenizer from GGUF metadata with transformers' converters (no torch import)."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_PRE_TOKENIZER_SPLITS,
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:
        raise ImportError("a GGUF tokenizer needs transformers.integrations.gguf (5.23 or newer)") from e

    meta = gguf_metadata(path)
    if "tokenizer.ggml.tokens" not in meta:
        raise UserError(f"{path}: the GGUF file has no tokenizer metadata; use a GGUF that carries its tokenizer")
    spec = {
        name: meta[f"tokenizer.{key}"]
        for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
        if f"tokenizer.{key}" in meta
    }
    backend, _ = convert_gguf_tokenizer(meta["general.architecture"], spec)
    pre = spec.get("pre_tokenizer_type")
    if spec.get("tokenizer_type") == "gpt2" and pre not in GGUF_PRE_TOKENIZER_SPLITS:
        if pre in _DIGIT_SPLIT_PRE:
            digits = pre_tokenizers.Digits(individual_digits=True)
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
            backend.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
        elif pre not in (None, "default", "gpt-2"):
            warnings.warn(f"{path}: unknown GGUF pre-tokenizer {pre!r}; splitting with GPT-2's regex")

    tokens = spec["tokens"]
    specials = {
        name: tokens[meta[f"tokenizer.ggml.{key}"]]
        for name, key in _GGUF_SPECIALS.items()
        if f"tokenizer.ggml.{key}" in meta
    }
    # As llama.cpp: SentencePiece vocabularies add BOS unless the file says otherwise.
    add_bos = meta.get("tokenizer.ggml.add_bos_token", spec.get("tokenizer_type") == "llama")
    if spec.get("tokenizer_type") == "gemma4":  # the reference tokenizer adds none (as transformers)
        add_bos = False
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        name_or_path=str(path),
        add_bos_token=bool(add_bos),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
        **specials,
    )


# GGUF value types: struct formats of the scalars; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def gguf_metadata(path: str | os.PathLike[str]) -> dict[str, object]:
    """The key/value metadata of a GGUF file (v2/v3, little-endian); tensors are not read.

    Reads only the front of the file, and arrays of numbers in one go: far faster than
    `gguf.GGUFReader`, which indexes every tensor and every array element.
    """
    with open(path, "rb") as f:
        head = f.read(24)
        if not b"GGUF".startswith(head[:4]):
            raise UserError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
        if len(head) < 24:
            raise UserError(f"{path}: truncated GGUF file ({len(head)} bytes, shorter than its 24-byte header); "
                            "download it again")
        version, _, count = struct.unpack_from("<IQQ", head, 4)
        if version not in (2, 3):
            raise UserError(f"{path}: GGUF version {version} is not supported (2 or 3 are); "
                            "convert it with a current llama.cpp")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            pos, meta = 24, {}
            try:
                for _ in range(count):
                    key, pos = _gguf_string(buf, pos)
                    (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
                    meta[key], pos = _gguf_value(buf, pos, kind)
            except (struct.error, ValueError, KeyError) as e:
                raise UserError(f"{path}: truncated or corrupt GGUF metadata (entry {len(meta)} of {count}: "
                                f"{type(e).__name__}: {e}); download it again") from None
            return meta


def _gguf_string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return buf[pos + 8 : pos + 8 + n].decode("utf-8", errors="replace"), pos + 8 + n


def _gguf_value(buf, pos: int, kind: int) -> tuple[object, int]:
    if kind == 8:
        return _gguf_string(buf, pos)
    if kind != 9:
        fmt = "<" + _GGUF_SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    item, n = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _GGUF_SCALARS:
        dtype = np.dtype("<" + _GGUF_SCALARS[item])
        return np.frombuffer(buf, dtype, n, pos).tolist(), pos + n * dtype.itemsize
    values = []
    for _ in range(n):
        value, pos = _gguf_value(buf, pos, item)
        values.append(value)
    return values, pos


# ---------------------------------------------------------------------------- model agreement


def check_vocab(tok: PreTrainedTokenizerBase, model_cfg, where: str) -> None:
    """Raise `UserError` when the tokenizer can produce ids the model has no embedding for.

    `model_cfg` is a `ModelConfig` (or anything with `vocab_size`); `where` names what is being paired
    (a model path, a run directory). A model may have more rows than the tokenizer has tokens (vocabularies
    are padded), never fewer: an id past the table reads garbage, which surfaces far later as NaN scores.
    """
    vocab_size = int(model_cfg.vocab_size)
    ids = {name: i for name, i in tok.get_vocab().items() if i >= vocab_size}
    if ids:
        name, top = max(ids.items(), key=lambda kv: kv[1])
        raise UserError(
            f"{where}: the tokenizer {tok.name_or_path or ''} does not belong to the model: its token {name!r} "
            f"has id {top} ({len(ids)} token(s) at or past the model's vocab_size {vocab_size}); "
            "load the tokenizer that ships with the model (model.path)")


# ----------------------------------------------------------------------------------- BOS and EOS


def special_tokens(tok: PreTrainedTokenizerBase) -> tuple[int | None, int]:
    """``(bos_id or None, eos_id)``: what to put before and after a text.

    BOS is the token the tokenizer's own post-processor puts before a text (Llama-2 ``<s>``,
    Llama-3 ``<|begin_of_text|>``), None if it puts none (Qwen2; SmolLM2, whose GGUF names
    ``<|im_start|>`` as BOS but says ``add_bos_token=False``, so llama.cpp adds none either). To
    change it, configure the tokenizer (``tok.add_bos_token = True``). EOS is ``tok.eos_token_id``
    (e.g. Llama-3 base ``<|end_of_text|>``, instruct ``<|eot_id|>``; as the tokenizer config says).
    """
    eos = tok.eos_token_id
    if eos is None:
        raise ValueError(f"{tok.name_or_path}: the tokenizer has no eos_token")
    probe = "a"
    plain = tok.encode(probe, add_special_tokens=False)
    full = tok.encode(probe, add_special_tokens=True)
    positions = range(len(full) - len(plain) + 1)
    head = next((i for i in positions if full[i : i + len(plain)] == plain), None)
    if head is None or head > 1:
        added = tok.convert_ids_to_tokens(full)
        raise ValueError(f"{tok.name_or_path}: cannot tell BOS from how {probe!r} is encoded: {added}")
    return (full[0] if head else None), eos


# ------------------------------------------------------------------------- continuation boundaries


class Continuation(NamedTuple):
    """``ids[start:]`` are the continuation's tokens: the ones to score (``start >= 1``)."""

    ids: list[int]  # [BOS] + tokens of prompt + continuation, encoded together
    start: int  # index in `ids` of the first continuation token
    overlap: int  # prompt characters that ids[start] also covers (0: the tokens split at the boundary)


def encode_continuation(tok: PreTrainedTokenizerBase, prompt: str, continuation: str) -> Continuation:
    """Encode ``prompt + continuation`` together and locate the continuation's tokens."""
    return encode_continuations(tok, [(prompt, continuation)])[0]


def encode_continuations(
    tok: PreTrainedTokenizerBase, pairs: Iterable[tuple[str, str]]
) -> list[Continuation]:
    """`encode_continuation` for many ``(prompt, continuation)`` pairs in one batched call."""
    pairs = list(pairs)
    if any(not continuation for _, continuation in pairs):
        raise ValueError("empty continuation: nothing to score")
    return _encode_pairs(tok, pairs, special_tokens(tok)[0])


def _encode_pairs(
    tok: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], bos: int | None
) -> list[Continuation]:
    head = [] if bos is None else [bos]
    encoded = _encode_texts(tok, [prompt + continuation for prompt, continuation in pairs])
    out = []
    for i, ((prompt, _), (ids, offsets)) in enumerate(zip(pairs, encoded)):
        start, overlap = _split(offsets, len(prompt))
        if not head and start == 0:
            raise ValueError(
                f"pair #{i}: the first continuation token starts the text (prompt {prompt!r}) and "
                "there is no BOS: no token precedes it to predict it from"
            )
        out.append(Continuation(head + ids, len(head) + start, overlap))
    return out


def _split(offsets: Sequence[Sequence[int]], boundary: int) -> tuple[int, int]:
    """Index of the first token past ``boundary`` and how far before ``boundary`` it starts."""
    start = next((i for i, (s, e) in enumerate(offsets) if e > boundary or s >= boundary), None)
    if start is None:
        raise ValueError("no token covers the text after the prompt")
    if any(e <= boundary and s < boundary for s, e in offsets[start + 1 :]):
        window = list(offsets[max(0, start - 2) : start + 8])
        raise RuntimeError(f"token offsets are not monotonic around character {boundary}: {window}")
    return start, max(0, boundary - offsets[start][0])


def _encode_texts(tok: PreTrainedTokenizerBase, texts: list[str]) -> list[tuple[list[int], list]]:
    """Ids and character offsets of each text, without special tokens, in one batched call."""
    if not texts:
        return []
    backend = _untrimmed_backend(tok)
    if backend is not None:
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    enc = tok(
        texts,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )
    return list(zip(enc["input_ids"], enc["offset_mapping"]))


_UNTRIMMED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _untrimmed_backend(tok: PreTrainedTokenizerBase) -> Tokenizer | None:
    """A copy of the backend without post-processor, if the post-processor trims offsets.

    A byte-level post-processor with ``trim_offsets=True`` (RoBERTa style) drops the leading space
    from a token's span, which would hide a straddling ``"Ġword"``. Its ids are unchanged, so a copy
    without it gives the same ids and untrimmed spans. Built once per tokenizer (it costs a copy).
    """
    if tok not in _UNTRIMMED:
        backend = tok.backend_tokenizer
        processor = backend.post_processor
        trims = processor is not None and _trims_offsets(json.loads(processor.__getstate__()))
        copy = None
        if trims:
            copy = Tokenizer.from_str(backend.to_str())
            copy.post_processor = None
            copy.no_truncation()
            copy.no_padding()
            copy.encode_special_tokens = backend.encode_special_tokens
        _UNTRIMMED[tok] = copy
    return _UNTRIMMED[tok]


def _trims_offsets(config: dict) -> bool:
    if config.get("type") == "Sequence":
        return any(_trims_offsets(p) for p in config.get("processors", ()))
    return config.get("type") in ("ByteLevel", "RobertaProcessing") and bool(config.get("trim_offsets"))


# ------------------------------------------------------------------------------------ SFT examples


@dataclasses.dataclass(frozen=True)
class SFTTemplate:
    """Prompt ``question_prefix + question + answer_prefix``, target ``target_prefix + answer +
    target_suffix`` followed by the EOS id; BOS (if any) goes before the prompt."""

    question_prefix: str = "<|question|> "
    answer_prefix: str = " <|answer|>"
    target_prefix: str = " "
    target_suffix: str = " "

    def prompt(self, question: str) -> str:
        return f"{self.question_prefix}{question}{self.answer_prefix}"

    def target(self, answer: str) -> str:
        return f"{self.target_prefix}{answer}{self.target_suffix}"


PAPER_TEMPLATE = SFTTemplate()


class SequenceTooLongError(UserError):
    """Items that do not fit in ``max_length`` under the chosen truncation policy."""

    def __init__(self, items: list[tuple[int, str, int]], max_length: int):
        self.items = items  # (index, question, tokens)
        shown = "; ".join(f"#{i} {q[:60]!r} ({n} tokens)" for i, q, n in items[:5])
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        super().__init__(f"{len(items)} item(s) longer than max_length={max_length}: {shown}{more}; raise "
                         "train.max_length or set train.truncation=left")


@dataclasses.dataclass(frozen=True)
class SFTReport:
    """What `encode_sft_batch` did; fields with indices refer to positions in its input."""

    total: int
    truncated: tuple[int, ...]  # prompt cut from the left to fit (truncation="left")
    skipped: tuple[int, ...]  # dropped as too long (truncation="skip")
    straddled: tuple[int, ...]  # a token crossed the prompt/target boundary; it was trained on
    longest: int  # tokens in the longest item before truncation

    @property
    def kept(self) -> int:
        return self.total - len(self.skipped)

    def __str__(self) -> str:
        return (
            f"{self.kept}/{self.total} items kept, {len(self.truncated)} truncated, {len(self.skipped)} "
            f"skipped, {len(self.straddled)} with a straddling token; longest {self.longest} tokens"
        )


def encode_sft(
    tok: PreTrainedTokenizerBase,
    question: str,
    answer: str,
    *,
    template: SFTTemplate = PAPER_TEMPLATE,
    max_length: int | None = None,
    truncation: Literal["refuse", "left"] = "refuse",
) -> dict[str, list[int]]:
    """One SFT example: ``input_ids`` and ``loss_mask`` (1 exactly on the target tokens and EOS).

    Prompt and target are encoded together and split as in `encode_continuation`, so the trained
    tokens are the ones the model emits after the prompt at inference.
    """
    if truncation not in ("refuse", "left"):
        raise ValueError(f"truncation must be 'refuse' or 'left' for one item, not {truncation!r}")
    examples, _ = encode_sft_batch(
        tok, [(question, answer)], template=template, max_length=max_length, truncation=truncation
    )
    return examples[0]


def encode_sft_batch(
    tok: PreTrainedTokenizerBase,
    items: Iterable[tuple[str, str]],
    *,
    template: SFTTemplate = PAPER_TEMPLATE,
    max_length: int | None = None,
    truncation: Truncation = "refuse",
) -> tuple[list[dict[str, list[int]]], SFTReport]:
    """`encode_sft` for ``(question, answer)`` pairs, with a report.

    Items longer than ``max_length`` tokens: ``"refuse"`` raises `SequenceTooLongError` naming all
    of them; ``"skip"`` drops them (listed in the report); ``"left"`` drops prompt tokens from the
    left, after BOS, keeping the whole target and at least one token before it; an item whose
    target leaves no room for that is refused.
    """
    if truncation not in ("refuse", "left", "skip"):
        raise ValueError(f"truncation must be 'refuse', 'left' or 'skip', not {truncation!r}")
    items = list(items)
    bos, eos = special_tokens(tok)
    head = [] if bos is None else [bos]
    pairs = [(template.prompt(q), template.target(a)) for q, a in items]
    examples, truncated, skipped, straddled, refused = [], [], [], [], []
    longest = 0
    for i, c in enumerate(_encode_pairs(tok, pairs, bos)):
        if c.overlap:
            straddled.append(i)
        body, target = c.ids[len(head) : c.start], c.ids[c.start :] + [eos]
        length = len(head) + len(body) + len(target)
        longest = max(longest, length)
        if max_length is not None and length > max_length:
            room = max_length - len(target) - len(head)  # prompt tokens that fit after BOS
            if truncation == "left" and room >= (0 if head else 1):
                body = body[len(body) - room :]
                truncated.append(i)
            elif truncation == "skip":
                skipped.append(i)
                continue
            else:
                refused.append((i, items[i][0], length))
                continue
        context = head + body
        mask = [0] * len(context) + [1] * len(target)
        examples.append({"input_ids": context + target, "loss_mask": mask})
    if refused:
        raise SequenceTooLongError(refused, max_length)
    report = SFTReport(len(items), tuple(truncated), tuple(skipped), tuple(straddled), longest)
    return examples, report
