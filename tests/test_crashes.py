"""Crash injection: the whole experiment killed after its k-th write, for every k, then run again.

Every write goes through `jaxsft.workdir.Workdir` (a file, or a directory published whole); orbax
writes checkpoints with its own commit protocol. A crash after any write must leave a workdir that
the next run finishes, with the outputs of a run never stopped.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from safetensors.numpy import load

import hf_models
from jaxsft import config as config_lib
from jaxsft import run
from jaxsft.workdir import Workdir

CELL = pathlib.Path("sft", "levelmixed-size8-seed0")
# Outputs that must not depend on a crash: scores, training set, model, predictions (baseline and cell).
COMPARED = ["memorization/shard-00000-of-00001.parquet", "test_scores/memorization/shard-00000-of-00001.parquet",
            "memorization/levels.json", "test_scores/memorization/levels.json",
            "train_sets/levelmixed-size8-seed0/manifest.json", "baseline/eval/predictions.jsonl",
            f"{CELL}/eval/predictions.jsonl"]


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("crashes")
    hf_models.build("llama2", root / "model")
    hf_models.char_tokenizer().save_pretrained(root / "model")
    c = config_lib.default_config()
    c.model.path = str(root / "model")
    c.data.limit_per_relation = 1
    c.scoring.batch_size = 16
    c.train.update(max_length=96, checkpoint_every=0, batch_size=8)
    c.eval.update(batch_size=16, max_new_tokens=4, buckets=(64, 96))
    c.grid.update(levels=("mixed",), sizes=("8",), seeds=(0,))
    return c


def _outputs(workdir: pathlib.Path) -> dict[str, object]:
    out = {name: (workdir / name).read_bytes() for name in COMPARED}
    out["model"] = load((workdir / CELL / "model" / "model.safetensors").read_bytes())
    metrics = json.loads((workdir / CELL / "eval" / "metrics.json").read_text())
    out["metrics"] = {k: metrics[k] for k in ("accuracy", "macro", "count", "items", "correct")}
    return out


def _assert_same(got: dict, expected: dict, k: int) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        if name == "model":
            assert got[name].keys() == expected[name].keys()
            for tensor in expected[name]:
                assert (got[name][tensor] == expected[name][tensor]).all(), (k, tensor)
        else:
            assert got[name] == expected[name], (k, name)


@pytest.mark.parametrize("stride", [pytest.param(1, marks=pytest.mark.slow, id="every-write"),
                                    pytest.param(5, id="every-5th-write")])
def test_a_run_killed_after_any_write_finishes_as_if_never_stopped(tiny, tmp_path, monkeypatch, stride):
    """Every k (`make test-slow`), or every 5th k and the last (the default suite: ~1 minute)."""
    writes = []
    real_write, real_publish = Workdir.write_bytes, Workdir.publish

    def counting(limit):
        def write_bytes(self, name, data):
            path = real_write(self, name, data)
            writes.append(str(path))
            if len(writes) == limit:
                raise Crash(path)
            return path

        def publish(self, fill, marker):
            out = real_publish(self, fill, marker)
            writes.append(str(self.root))
            if len(writes) == limit:
                raise Crash(self.root)
            return out

        monkeypatch.setattr(Workdir, "write_bytes", write_bytes)
        monkeypatch.setattr(Workdir, "publish", publish)

    counting(limit=0)
    run.run(tiny, tmp_path / "reference")
    total = len(writes)
    expected = _outputs(tmp_path / "reference")
    assert total >= 15, writes

    for k in sorted({*range(1, total + 1, stride), total}):
        writes.clear()
        counting(limit=k)
        with pytest.raises(Crash):
            run.run(tiny, tmp_path / str(k))
        monkeypatch.undo()
        run.run(tiny, tmp_path / str(k))
        _assert_same(_outputs(tmp_path / str(k)), expected, k)
