"""The exported model opens in transformers alone and answers as ours; the card; the hub upload switch."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest

import hf_models
from jaxsft import config as config_lib
from jaxsft import evaluate, export, generate, models, tokenization

QUESTIONS = ["Where was Ada Lovelace born?", "Who is the author of Hamlet?", "What is the capital of Peru?"]
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def tokenizer(smollm2_gguf):
    """SmolLM2's real tokenizer (49,152 ids), rebuilt from its GGUF: no BOS added, EOS <|im_end|> (2)."""
    return tokenization.load_tokenizer(smollm2_gguf)


def _config(model_path):
    c = config_lib.default_config()
    c.model.path = str(model_path)
    c.select.update(level="2", size="60", seed=3)
    return c


def _train_set() -> datasets.Dataset:
    return datasets.Dataset.from_dict(dict(id=["P17.train.1", "P19.train.7"], relation=["P17", "P19"], level=[2, 2],
                                           question=QUESTIONS[:2], answers=[["London"], ["Shakespeare"]]))


@pytest.mark.parametrize("family", list(hf_models.FAMILIES))
def test_export_opens_in_transformers_and_answers_as_ours(family, tokenizer, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = tmp_path / "base"
    torch_model = hf_models.build(family, base, vocab_size=len(tokenizer))
    cfg = _config(base)
    prompts = evaluate.prompt_ids(tokenizer, QUESTIONS, cfg.prompt)  # what our evaluation reads
    # A second EOS id in config.json, the third token greedy decoding emits for the first question: both
    # decoders must stop there (random models never emit the real EOS).
    with torch.no_grad():
        extra = int(torch_model.generate(torch.tensor(prompts[:1]), max_new_tokens=3, do_sample=False)[0, -1])
    hf_config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(hf_config, eos_token_id=[2, extra])))
    ours = models.from_pretrained(base)
    out = export.save(cfg, ours, tmp_path / "sft" / "level2-size60-seed3" / "model", tokenizer=tokenizer,
                      train_set=_train_set())
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    assert not list(out.parent.glob(".model*"))  # no staging left behind

    their_tok = AutoTokenizer.from_pretrained(out)
    their_model = AutoModelForCausalLM.from_pretrained(out)
    p = cfg.prompt
    assert [their_tok(p.question_prefix + q + p.answer_prefix)["input_ids"] for q in QUESTIONS] == prompts
    eos_ids = sorted({tokenization.special_tokens(tokenizer)[1], *ours.cfg.eos_ids})
    assert eos_ids == sorted({2, extra})
    gen = their_model.generation_config
    assert np.atleast_1d(gen.eos_token_id).tolist() == eos_ids and gen.pad_token_id == tokenizer.pad_token_id
    assert gen.do_sample is False

    stop = generate.stop_token_table(tokenizer, eos_ids, stop_on_newline=False)  # transformers: EOS only
    mine = generate.generate(ours, prompts, stop_table=stop, max_new_tokens=NEW_TOKENS, buckets=(32,),
                             batch_size=len(prompts))
    assert len(mine[0][0]) <= 3 and mine[0][0][-1] in eos_ids
    with torch.no_grad():
        for prompt, (tokens,) in zip(prompts, mine):
            theirs = their_model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS)[0, len(prompt):]
            assert theirs.tolist() == tokens, (family, their_tok.decode(prompt))

    # The card's snippet runs as written on the directory.
    card = (out / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    printed = []
    exec(snippet.replace('path = "."', f"path = {str(out)!r}"), {"print": printed.append})
    assert len(printed) == 1 and isinstance(printed[0], str)


def test_card_names_base_training_set_and_hyperparameters_then_accuracies(tmp_path, monkeypatch):
    import huggingface_hub

    cfg = _config(config_lib.EMBEDDED_MODEL)
    info = export.training_set_info(cfg, _train_set())
    card = export.model_card(cfg, info, name="level2-size60-seed3")
    assert card.startswith("---\n") and f"base_model: {export.EMBEDDED_SOURCE}" in card
    assert "# level2-size60-seed3" in card and "Not evaluated yet." in card
    assert info["ids_sha256"] in card and "| items | 2 |" in card and "| seed | 3 |" in card
    assert f"| learning_rate | {cfg.train.learning_rate} |" in card and "| epochs | 1 |" in card
    assert json.dumps("<|question|> Where was Ada Lovelace born? <|answer|>") in card  # how to prompt it
    assert export.training_set_info(cfg, datasets.Dataset.from_dict(dict(question=["q"], answers=[["a"]])))["count"] == 1

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub was called with export.hub_repo empty")

    monkeypatch.setattr(huggingface_hub, "create_repo", no_hub)
    monkeypatch.setattr(huggingface_hub, "upload_folder", no_hub)
    model_dir = tmp_path / "sft" / "level2-size60-seed3" / "model"
    model_dir.mkdir(parents=True)
    (tmp_path / "manifest.json").write_text(json.dumps(info))
    metrics = dict(accuracy={"id": {"0": 0.5, "1": None, "2": 0.25, "3": 1.0, "4": 0.0},
                             "ood": {"0": 0.125, "1": None, "2": None, "3": None, "4": None}},
                   macro={"id": 0.4375, "ood": 0.125}, items=11, split="test")
    export.finish(cfg, model_dir, json.loads((tmp_path / "manifest.json").read_text()), metrics)
    card = (model_dir / "README.md").read_text()
    assert "| ID | 50.0 | – | 25.0 | 100.0 | 0.0 | 43.8 |" in card and "| OOD | 12.5 | – | – | – | – | 12.5 |" in card
    assert "(11 items)" in card and info["ids_sha256"] in card

    calls = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: calls.append(("create", repo, kw)))
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.append(("upload", kw)))
    cfg.export.hub_repo = "someone/smollm2-qa"
    config_lib.validate(cfg)
    export.finish(cfg, model_dir, info, metrics)
    assert calls == [("create", "someone/smollm2-qa", dict(private=True, exist_ok=True)),
                     ("upload", dict(repo_id="someone/smollm2-qa", folder_path=str(model_dir),
                                     path_in_repo="level2-size60-seed3", commit_message="jaxsft: level2-size60-seed3"))]
    def offline(**kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "upload_folder", offline)
    export.finish(cfg, model_dir, info, metrics)  # an experiment goes on: logged
    with pytest.raises(OSError, match="no network"):
        export.finish(cfg, model_dir, info, metrics, strict=True)
    cfg.export.hub_repo = "someone/qa-{cell}"  # a repo per cell, the model at its root
    assert export.hub_target(cfg, "level2-size60-seed3") == ("someone/qa-level2-size60-seed3", None)
    cfg.export.hub_repo = "not a repo"
    with pytest.raises(ValueError, match="config.export.hub_repo"):
        config_lib.validate(cfg)
