"""Evaluation metrics in the cell's TensorBoard and, offline, in a Weights & Biases run."""

from __future__ import annotations

import json
import pathlib
import struct

import pytest
import tensorboardX

from jaxsft import config as config_lib
from jaxsft import evaluate, tracking

ITEMS = [("P17", 0, "Which country is Berlin located in?", ["Germany"], "Germany"),
         ("P19", 2, "Where was Vladimir Nabokov born?", ["Saint Petersburg"], "Moscow"),
         ("P50", 3, "Who is the author of Hamlet?", ["William Shakespeare"], "Shakespeare")]


def _evaluated(run_dir: pathlib.Path, steps: int = 3):
    """A cell trained for `steps` steps (TensorBoard curves as the trainer writes them) and its evaluation."""
    with tensorboardX.SummaryWriter(str(run_dir / "tensorboard")) as writer:
        for step in range(steps):
            writer.add_scalar("train/loss", 2.0 - 0.5 * step, step)
            writer.add_scalar("train/learning_rate", 1e-5, step)
    (run_dir / "train_summary.json").write_text(json.dumps(dict(steps=steps)))
    items = [dict(id=f"{r}.test.{i}", relation=r, level=lv, question=q, answers=a) for i, (r, lv, q, a, _) in
             enumerate(ITEMS)]
    predictions = evaluate.score(items, [p for *_, p in ITEMS])
    return predictions, evaluate.metrics(predictions)


def test_eval_scalars_join_the_training_curves_at_the_final_step(tmp_path):
    run_dir = tmp_path / "sft" / "level0-size60-seed0"
    predictions, metrics = _evaluated(run_dir)
    tracking.log_evaluation(config_lib.default_config(), run_dir, metrics, predictions)
    evals = tracking.training_curves(run_dir / "tensorboard", prefix="eval/")
    assert evals == {3: {"eval/id/level0": 1.0, "eval/id/level2": 0.0, "eval/id/macro": 0.5,
                         "eval/ood/level3": 1.0, "eval/ood/macro": 1.0}}
    assert sorted(tracking.training_curves(run_dir / "tensorboard")) == [0, 1, 2]


def wandb_records(path: pathlib.Path) -> list:
    """The protobuf records of an offline run's `.wandb` file (a `:W&B` header, then LevelDB-log blocks)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, chunk = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_wandb_offline_run_holds_config_training_curves_and_eval_tables(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = config_lib.default_config()
    cfg.logging.wandb_project = "jaxsft-test"
    config_lib.validate(cfg)
    run_dir = tmp_path / "exp" / "sft" / "level0-size60-seed0"
    predictions, metrics = _evaluated(run_dir)
    tracking.log_evaluation(cfg, run_dir, metrics, predictions)
    wandb.teardown()  # wandb-core writes the run file after `finish` returns: wait for it, as at exit

    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    records = wandb_records(run_file)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.run_group, run.job_type) == (
        "jaxsft-test", "level0-size60-seed0", "exp", "sft")
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    assert config["train"]["learning_rate"] == cfg.train.learning_rate and config["model"]["path"] == cfg.model.path
    history = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history[row["_step"]] = row
    assert [history[s]["train/loss"] for s in range(3)] == [2.0, 1.5, 1.0]
    assert {k: history[3][k] for k in ("eval/id/level0", "eval/id/macro", "eval/ood/macro")} == {
        "eval/id/level0": 1.0, "eval/id/macro": 0.5, "eval/ood/macro": 1.0}
    tables = {p.name.rsplit("_", 2)[0]: json.loads(p.read_text())
              for p in run_file.parent.glob("files/media/table/**/*.table.json")}
    assert tables["predictions"]["data"] == [[p["id"], p["relation"], p["role"], p["level"], p["question"],
                                              " | ".join(p["answers"]), p["prediction"], p["correct"]]
                                             for p in predictions]
    assert ["id", 2, 0.0, 1] in tables["accuracy"]["data"] and ["ood", 1, None, 0] in tables["accuracy"]["data"]


def test_wandb_failure_is_logged_and_the_experiment_goes_on(tmp_path, monkeypatch, caplog):
    wandb = pytest.importorskip("wandb")

    def not_logged_in(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", not_logged_in)
    cfg = config_lib.default_config()
    cfg.logging.wandb_project = "jaxsft-test"
    run_dir = tmp_path / "sft" / "level0-size60-seed0"
    predictions, metrics = _evaluated(run_dir)
    tracking.log_evaluation(cfg, run_dir, metrics, predictions)
    assert "W&B logging" in caplog.text and "api_key not configured" in caplog.text
    assert tracking.training_curves(run_dir / "tensorboard", prefix="eval/")  # TensorBoard has them all the same
