"""The users' path: a `gs://` workdir and models in a bucket, against a real GCS server on 127.0.0.1."""

from __future__ import annotations

import random
import signal
import time

import numpy as np
import pytest
from safetensors.numpy import load

import hf_models
from conftest import finish, launch, output, tiny_experiment, write_scores
from jaxsft import config as config_lib
from jaxsft import models, runtime
from jaxsft.data.relations import ID_RELATIONS
from jaxsft.models import sources

BUCKET = "jaxsft-test"


def test_model_in_a_bucket_loads_by_ranges_and_matches_local(gcs, tmp_path):
    hf_models.build("qwen2", tmp_path / "model")  # biases and tied embeddings
    hf_models.char_tokenizer().save_pretrained(tmp_path / "model")
    gcs.put(str(tmp_path / "model"), f"{BUCKET}/models/qwen2", recursive=True)
    remote = f"gs://{BUCKET}/models/qwen2"
    files = sources.locate(remote)
    assert files.weights == remote and not list(files.local.glob("*.safetensors"))  # weights stay in the bucket
    ids = np.array([[1, 5, 9, 33, 70, 2]])
    local = models.from_pretrained(tmp_path / "model")
    np.testing.assert_array_equal(np.asarray(models.from_pretrained(remote)(ids)), np.asarray(local(ids)))
    cfg = config_lib.default_config()
    assert (runtime.load_tokenizer(cfg, remote).get_vocab()
            == runtime.load_tokenizer(cfg, str(tmp_path / "model")).get_vocab())


def _objects(gcs, prefix: str) -> dict[str, int]:
    """Object name -> generation (changes whenever the object is written again)."""
    gcs.invalidate_cache()
    return {name.removeprefix(f"{prefix}/"): int(info["generation"])
            for name, info in gcs.find(prefix, detail=True).items()}


def test_whole_experiment_in_a_bucket_and_a_rerun_redoes_nothing(gcs, tmp_path):
    config = tiny_experiment(tmp_path)
    workdir = f"gs://{BUCKET}/e2e"
    finish(launch("jaxsft.run", [f"--config={config}", f"--workdir={workdir}"]))
    first = _objects(gcs, f"{BUCKET}/e2e")
    cell = "sft/levelmixed-size8-seed0"
    for name in ["memorization/manifest.json", "memorization/shard-00000-of-00001.parquet",
                 "memorization/levels.png", "memorization/done.json",
                 "test_scores/memorization/done.json", "train_sets/levelmixed-size8-seed0/manifest.json",
                 f"{cell}/config.json", f"{cell}/train_summary.json", f"{cell}/model/config.json",
                 f"{cell}/model/model.safetensors", f"{cell}/eval/predictions.jsonl", f"{cell}/eval/metrics.json",
                 "report.md", "levels_train.png", "levels_test.png", "accuracy_vs_size.png", "timings.json"]:
        assert name in first, sorted(first)
    assert any(n.startswith(f"{cell}/checkpoints/2/") for n in first), sorted(first)
    assert any(n.startswith(f"{cell}/tensorboard/events.") for n in first), sorted(first)
    assert not [n for n in first if "/." in n or n.startswith(".")]  # no scratch object left behind
    with gcs.open(f"{BUCKET}/e2e/{cell}/model/model.safetensors", "rb") as f:
        assert load(f.read())  # a whole safetensors file
    assert "| mixed | 8 | 8 |" in gcs.cat(f"{BUCKET}/e2e/report.md").decode()

    finish(launch("jaxsft.run", [f"--config={config}", f"--workdir={workdir}"]))
    second = _objects(gcs, f"{BUCKET}/e2e")
    rewritten = {n for n in first if second.get(n) != first[n]}
    assert rewritten <= {"report.md", "timings.json", "levels_train.png", "levels_test.png", "accuracy_vs_size.png"}


def test_training_killed_in_a_bucket_resumes_bit_identical(gcs, tmp_path):
    """SIGKILL at a random step of `python -m jaxsft.train` on a gs:// workdir; the rerun resumes from the
    bucket's checkpoints and exports the parameters of a run never stopped (on a local disk)."""
    config = tiny_experiment(tmp_path, epochs=6, checkpoint_every=1, keep_checkpoints=2, learning_rate=1e-3)
    rows = [dict(id=f"{r}-{i}", split="train", relation=r, subject="s", question=f"Where is {n}?",
                 answers=[n[::-1]], R=0.5, level=0) for r in ID_RELATIONS for i, n in enumerate(["Ann", "Bob"])]
    args = ["--config.select.level=0", "--config.select.size=8"]
    local, remote = tmp_path / "local", f"gs://{BUCKET}/killed"
    write_scores(local, rows)
    write_scores(remote, rows)
    finish(launch("jaxsft.train", [f"--config={config}", f"--workdir={local}", *args]))

    cell = f"{BUCKET}/killed/sft/level0-size8-seed0"
    kill_after = random.Random().randint(2, 9)  # of 12 steps
    (proc,) = launch("jaxsft.train", [f"--config={config}", f"--workdir={remote}", *args])
    deadline = time.monotonic() + 300
    while True:
        gcs.invalidate_cache()
        steps = [int(p.rsplit("/", 1)[1]) for p in gcs.glob(f"{cell}/checkpoints/*") if p.rsplit("/", 1)[1].isdigit()]
        if steps and max(steps) >= kill_after:
            break
        assert proc.poll() is None, output(proc)[-4000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not gcs.exists(f"{cell}/model/config.json")
    (log,) = finish(launch("jaxsft.train", [f"--config={config}", f"--workdir={remote}", *args]))
    assert "resuming from step" in log

    expected = load((local / "sft" / "level0-size8-seed0" / "model" / "model.safetensors").read_bytes())
    got = load(gcs.cat(f"{cell}/model/model.safetensors"))
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
