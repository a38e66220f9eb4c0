"""Evaluation: scoring and metrics on hand-made predictions, test items from the scored parquet,
greedy answers independent of batch size and buckets, and the whole run writing its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import hf_models
from conftest import write_scores
from jaxsft import config, evaluate, models, tokenization

ITEMS = [  # (relation, level, question, answers)
    ("P17", 0, "Which country is Berlin located in?", ["Germany"]),
    ("P17", 0, "Which country is Tulsa located in?", ["United States of America"]),
    ("P36", 1, "What is the capital of Peru?", ["Lima"]),
    ("P19", 2, "Where was Vladimir Nabokov born?", ["Saint Petersburg"]),
    ("P19", 4, "Where was Ada Lovelace born?", ["London"]),
    ("P26", 0, "Who is Pierre Curie married to?", ["Marie Curie"]),
    ("P50", 3, "Who is the author of Hamlet?", ["William Shakespeare"]),
    ("P50", 3, "Who is the author of Emma?", ["Jane Austen"]),
]


def _items() -> list[dict]:
    return [dict(id=f"{r}.test.{i}", split="test", relation=r, subject="", question=q, answers=a,
                 R=lv / 4, level=lv) for i, (r, lv, q, a) in enumerate(ITEMS)]


def test_scoring_per_level_macro_and_aliases():
    predictions = [
        "Germany.",  # hit
        "the USA",  # alias of United States of America
        "Lima, Peru",  # hit
        "Leningrad",  # alias of Saint Petersburg
        "Paris",  # miss
        "marie curie",  # normalised hit
        "Shakespeare",  # alias of William Shakespeare
        "Charlotte Bronte",  # miss
    ]
    records = evaluate.score(_items(), predictions)
    assert [r["correct"] for r in records] == [True, True, True, True, False, True, True, False]
    assert [r["role"] for r in records] == ["ID"] * 5 + ["OOD"] * 3
    assert set(records[0]) == {"id", "relation", "role", "level", "question", "answers", "prediction", "correct"}
    m = evaluate.metrics(records)
    assert m["accuracy"]["id"] == {"0": 1.0, "1": 1.0, "2": 1.0, "3": None, "4": 0.0}
    assert m["accuracy"]["ood"] == {"0": 1.0, "1": None, "2": None, "3": 0.5, "4": None}
    assert m["count"]["id"] == {"0": 2, "1": 1, "2": 1, "3": 0, "4": 1}
    # macro: the unweighted mean over levels (with items), not the share of all items
    assert m["macro"]["id"] == pytest.approx(3 / 4)
    assert m["macro"]["ood"] == pytest.approx(0.75)
    assert (m["items"], m["correct"]) == (8, 6)


def test_macro_weighs_levels_equally():
    items = [dict(id=str(i), relation="P17", level=lv, question="q", answers=["x"])
             for i, lv in enumerate([0] * 9 + [1, 2, 3, 4])]
    records = evaluate.score(items, ["x"] * 9 + ["y"] * 4)
    m = evaluate.metrics(records)
    assert m["macro"]["id"] == pytest.approx(1 / 5)  # micro would be 9 / 13
    assert m["macro"]["ood"] is None and m["count"]["ood"] == dict.fromkeys("01234", 0)


def test_load_test_items(tmp_path):
    rows = _items()
    rows.insert(3, dict(rows[0], id="P17.train.9", split="train"))
    write_scores(tmp_path, rows, split="test")
    items = evaluate.load_test_items(tmp_path)
    assert [it["id"] for it in items] == [r["id"] for r in _items()]
    assert items[3]["answers"] == ["Saint Petersburg"] and items[3]["role"] == "ID" and items[5]["role"] == "OOD"
    limited = evaluate.load_test_items(tmp_path, limit_per_level=1)
    assert [it["id"] for it in limited] == ["P17.test.0", "P36.test.2", "P19.test.3", "P19.test.4", "P26.test.5",
                                            "P50.test.6"]
    write_scores(tmp_path / "other", rows, split="dev")  # the dev scores hold no dev facts
    with pytest.raises(ValueError, match="no 'dev' facts"):
        evaluate.load_test_items(tmp_path / "other", split="dev")
    with pytest.raises(FileNotFoundError, match="no scored test facts"):
        evaluate.load_test_items(tmp_path / "none")


def char_tokenizer():
    """A character-level tokenizer (BOS added, EOS, newline) whose ids fit the tiny models' vocab of 96."""
    from tokenizers import Tokenizer, decoders, models as tok_models, processors
    from transformers import PreTrainedTokenizerFast

    chars = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789?.,'-|<>\n"
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>", *chars])}
    backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random llama saved with the character tokenizer: (directory, model, tokenizer)."""
    directory = tmp_path_factory.mktemp("tiny")
    hf_models.build("llama2", directory)
    tokenizer = char_tokenizer()
    tokenizer.save_pretrained(directory)
    return directory, models.from_pretrained(directory), tokenizer


def _cfg(batch_size: int = 4, buckets=(64, 80, 96)):
    cfg = config.default_config()
    cfg.eval.batch_size, cfg.eval.buckets = batch_size, buckets
    return cfg


def test_prompt_is_the_sft_prompt(tiny):
    _, _, tokenizer = tiny
    (ids,) = evaluate.prompt_ids(tokenizer, ["Who?"], config.default_config().prompt)
    assert ids[0] == tokenization.special_tokens(tokenizer)[0] == 1
    assert tokenizer.decode(ids[1:]) == "<|question|> Who? <|answer|>"
    example = tokenization.encode_sft(tokenizer, "Who?", "Ada")  # training reads the same prefix
    assert example["input_ids"][:len(ids)] == ids


def test_greedy_answers_do_not_depend_on_batch_or_bucket(tiny):
    _, model, tokenizer = tiny
    questions = [q for _, _, q, _ in ITEMS] + ["Who?", "Which river flows through the capital of Hungary, Budapest?"]
    lengths = [len(p) for p in evaluate.prompt_ids(tokenizer, questions, config.default_config().prompt)]
    assert min(lengths) <= 32 < 48 < max(lengths) <= 96  # three buckets of the reference
    reference, generated = evaluate.predict(model, tokenizer, questions, _cfg(4, (32, 48, 64, 96)), progress=False)
    assert generated > 0 and len(set(reference)) > 1
    for batch_size, buckets in [(1, (64, 96)), (16, (128,)), (3, (40, 72, 100))]:
        got = evaluate.predict(model, tokenizer, questions, _cfg(batch_size, buckets), progress=False)
        assert got == (reference, generated), (batch_size, buckets)


def test_answers_stop_at_newline_and_eos(tiny):
    _, model, tokenizer = tiny
    assert evaluate.answer_text(tokenizer, tokenizer.encode(" Lima\nPeru", add_special_tokens=False)) == "Lima"
    assert evaluate.answer_text(tokenizer, tokenizer.encode(" Lima", add_special_tokens=False) + [2]) == "Lima"
    cfg = _cfg()
    cfg.eval.max_new_tokens = 3
    # at most max_new_tokens per answer; the stop token (kept by generate) counts as one
    outputs, generated = evaluate.predict(model, tokenizer, ["Where?"] * 2, cfg, progress=False)
    assert generated <= 6 and all(len(o) <= 3 for o in outputs)


def test_run_writes_predictions_and_metrics(tiny, tmp_path):
    directory, _, _ = tiny
    write_scores(tmp_path, _items(), split="test")
    workdir = tmp_path / "sft" / "level0-size60-seed0"
    cfg = _cfg()
    cfg.model.path = os.fspath(directory)
    result = evaluate.run(cfg, tmp_path)  # no fine-tuned model in the cell: loads cfg.model and its tokenizer
    records = [json.loads(line) for line in (workdir / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [it["id"] for it in _items()]
    assert json.loads((workdir / "eval" / "metrics.json").read_text()) == json.loads(json.dumps(result))
    assert result["model"] == os.fspath(directory) and result["items"] == len(ITEMS)
    assert result["accuracy"] == evaluate.metrics(records)["accuracy"]


def test_cli(tiny, tmp_path):
    directory, _, _ = tiny
    write_scores(tmp_path, _items(), split="test")
    (tmp_path / "config.py").write_text(
        "from jaxsft import config\n\n"
        "def get_config():\n"
        "    c = config.default_config()\n"
        f"    c.model.path = {os.fspath(directory)!r}\n"
        "    c.eval.buckets = (96,)\n"
        "    return c\n")
    proc = subprocess.run([sys.executable, "-m", "jaxsft.evaluate", f"--config={tmp_path / 'config.py'}",
                           f"--workdir={tmp_path}", "--config.eval.batch_size=8"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "sft" / "level0-size60-seed0" / "eval" / "metrics.json").read_text())
    assert metrics["items"] == len(ITEMS) and set(metrics["macro"]) == {"id", "ood"}
    assert "evaluate" in proc.stderr  # the tqdm bar


def test_progress_bar_on_process_zero_only(tiny, capfd, monkeypatch):
    import jax

    _, model, tokenizer = tiny
    cfg = _cfg()
    cfg.eval.max_new_tokens = 2
    evaluate.predict(model, tokenizer, ["Where?"], cfg)
    assert "evaluate" in capfd.readouterr().err
    monkeypatch.setattr(jax, "process_index", lambda: 1)  # another host of a multi-host job
    evaluate.predict(model, tokenizer, ["Where?"], cfg)
    assert "evaluate" not in capfd.readouterr().err
