"""The whole experiment on a tiny model: one command, resumable stages, config validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import huggingface_hub
import pytest

import hf_models
from jaxsft import config as config_lib
from jaxsft import export, run, score, tracking, train, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("tiny-llama")
    hf_models.build("llama2", model_dir)
    hf_models.char_tokenizer().save_pretrained(model_dir)
    c = config_lib.default_config()
    c.model.path = str(model_dir)
    c.data.limit_per_relation = 2
    c.scoring.batch_size = 16
    c.train.update(max_length=96, checkpoint_every=0)
    c.eval.update(batch_size=16, max_new_tokens=4, buckets=(64, 96))
    c.grid.update(levels=("mixed",), sizes=("8",), seeds=(0,))
    return c


def test_run_writes_the_report_and_resumes_without_redoing_stages(tiny_config, tmp_path, monkeypatch):
    report = run.run(tiny_config, tmp_path)
    text = report.read_text()
    assert "| mixed | 8 | 8 |" in text and "ID avg" in text
    for plot in ("levels_train.png", "levels_test.png", "accuracy_vs_size.png"):
        assert (tmp_path / plot).stat().st_size > 1000
    cell = train.run_dir(run.stage_config(tiny_config, select=dict(level="mixed", size="8", seed=0)), tmp_path)
    assert cell.exists("model", "config.json")
    # The model directory is complete (tokenizer, generation config) and its card has the accuracies.
    assert {"tokenizer.json", "generation_config.json"} <= {p.name for p in cell.path("model").iterdir()}
    metrics = cell.read_json("eval", "metrics.json")
    card = cell.read_text("model", "README.md")
    manifest = json.loads((tmp_path / "train_sets" / cell.root.name / "manifest.json").read_text())
    assert manifest["ids_sha256"] in card and f"({metrics['items']} items)" in card and "| ID |" in card
    # Accuracies sit beside the training curves in the cell's TensorBoard, which the report links.
    steps = cell.read_json("train_summary.json")["steps"]
    evals = tracking.training_curves(cell.path("tensorboard"), prefix="eval/")
    assert evals[steps]["eval/id/macro"] == pytest.approx(metrics["macro"]["id"])
    assert sorted(tracking.training_curves(cell.path("tensorboard"))) == list(range(steps))
    assert f"(sft/{cell.root.name}/tensorboard)" in text
    # Upload afterwards (`python -m jaxsft.export`): every evaluated cell, to its folder of the repo.
    uploads = []
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo, **kw: None)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: uploads.append(kw))
    assert export.finish_all(run.stage_config(tiny_config, export=dict(hub_repo="someone/qa")), tmp_path) == [
        cell.sub("model")]
    assert [(u["repo_id"], u["folder_path"], u["path_in_repo"]) for u in uploads] == [
        ("someone/qa", str(cell.path("model")), cell.root.name)]

    # Killed after training, before evaluating: the rerun only evaluates and reports.
    cell.path("eval", "metrics.json").unlink()
    report.unlink()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished stage ran again")

    monkeypatch.setattr(score, "score_facts", must_not_run)
    monkeypatch.setattr(training, "train", must_not_run)
    assert run.run(tiny_config, tmp_path).read_text().count("| mixed | 8 | 8 |") == 1
    assert cell.exists("eval", "metrics.json")


@pytest.mark.parametrize("override, message", [
    ("--config.scoring.method=bogus", "config.scoring.method = 'bogus'"),
    ("--config.grid.sizes=(60,-1)", "grid.sizes"),
    ("--config.scoring.no_such_field=1", "no_such_field"),
])
def test_bad_config_fails_before_loading_anything(override, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsft.run", "--config=configs/demo.py", override, f"--workdir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not list(tmp_path.iterdir())  # nothing was written


def test_every_shipped_config_validates():
    import importlib.util
    import pathlib

    for path in sorted(pathlib.Path(REPO, "configs").glob("*.py")):
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config_lib.validate(module.get_config())
