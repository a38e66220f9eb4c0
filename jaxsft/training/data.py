"""SFT batches: the training set encoded once, every item padded to one length, shuffled per epoch.

Every batch has the same [batch_size, max_length] shape (a short last batch is filled with empty
rows whose masks are 0), so the train step compiles once. The order of epoch e is a permutation
drawn by `numpy.random.default_rng([seed, e])`: the data position of a run is its step alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

import datasets
import ml_collections
import numpy as np

from jaxsft import batching, tokenization


@dataclasses.dataclass(frozen=True)
class Examples:
    """The encoded training set: int32 [items, max_length] arrays, right-padded."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    loss_mask: np.ndarray  # 1 on target tokens (the answer and EOS)
    report: tokenization.SFTReport

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def fingerprint(self) -> str:
        """sha256 of the arrays: a checkpoint resumes only on the data it was trained on."""
        h = hashlib.sha256()
        for a in (self.input_ids, self.attention_mask, self.loss_mask):
            h.update(a.tobytes())
        return h.hexdigest()


def template(prompt: ml_collections.ConfigDict) -> tokenization.SFTTemplate:
    """The SFT template of `cfg.prompt`; target prefix and suffix default to the paper's spaces."""
    default = tokenization.PAPER_TEMPLATE
    return tokenization.SFTTemplate(
        question_prefix=prompt.question_prefix, answer_prefix=prompt.answer_prefix,
        target_prefix=prompt.get("target_prefix", default.target_prefix),
        target_suffix=prompt.get("target_suffix", default.target_suffix))


def encode(train_set: datasets.Dataset, tokenizer, cfg: ml_collections.ConfigDict) -> Examples:
    """Question → first answer pairs as `encode_sft_batch` encodes them, padded to `cfg.train.max_length`.

    Over-long items follow `cfg.train.truncation` (`left`: the prompt loses its first tokens;
    `refuse`: an error names them); the counts are logged and kept in `Examples.report`.
    """
    t = cfg.train
    items = []
    for i, (question, answers) in enumerate(zip(train_set["question"], train_set["answers"])):
        if not answers:
            raise ValueError(f"training item #{i} {question!r} has no answer")
        items.append((question, answers[0]))
    rows, report = tokenization.encode_sft_batch(tokenizer, items, template=template(cfg.prompt),
                                                 max_length=t.max_length, truncation=t.truncation)
    logging.info("training set: %s", report)
    pad_id = tokenizer.pad_token_id or 0
    ids, attention = batching.pad([r["input_ids"] for r in rows], t.max_length, left=False, pad_id=pad_id)
    loss_mask, _ = batching.pad([r["loss_mask"] for r in rows], t.max_length, left=False)
    return Examples(ids, attention, loss_mask, report)


def steps_per_epoch(num_items: int, batch_size: int) -> int:
    return -(-num_items // batch_size)


def epoch_order(num_items: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_items)


def batch(examples: Examples, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """The batch of global step `step`: rows of epoch `step // steps_per_epoch` in its shuffled order."""
    epoch, index = divmod(step, steps_per_epoch(len(examples), batch_size))
    rows = epoch_order(len(examples), seed, epoch)[index * batch_size:(index + 1) * batch_size]
    out = {}
    for name in ("input_ids", "attention_mask", "loss_mask"):
        array = np.zeros((batch_size, examples.input_ids.shape[1]), np.int32)
        array[:len(rows)] = getattr(examples, name)[rows]
        out[name] = array
    return out


def position(examples: Examples, step: int, batch_size: int, seed: int) -> dict:
    """Where a run stands in its data (stored with each checkpoint, checked when resuming)."""
    epoch, index = divmod(step, steps_per_epoch(len(examples), batch_size))
    return dict(step=step, epoch=epoch, batch_in_epoch=index, batch_size=batch_size, seed=seed,
                num_items=len(examples), data_sha256=examples.fingerprint)
