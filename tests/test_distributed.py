"""Multi-process: 2 CPU processes joined by `jax.distributed` (coordinator on localhost).

The whole experiment on a `gs://` workdir gets the scores and trained parameters of a 1-process
run on a local disk, through one writer; and a SIGTERM to one host makes both save the same step.
"""

from __future__ import annotations

import json
import random
import re
import signal
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from safetensors.numpy import load

from conftest import finish, launch, output, tiny_experiment, write_scores
from jaxsft.data.relations import ID_RELATIONS

BUCKET = "jaxsft-test"
CELL = "sft/levelmixed-size8-seed0"


BAR = re.compile(r"(memorization \(\w+\)|train|evaluate): +\d+%\|")  # a tqdm bar of a stage


def _scores(read) -> dict[str, float]:
    rows = {}
    for directory in ("memorization", "test_scores/memorization"):
        manifest = json.loads(read(f"{directory}/manifest.json"))
        n = -(-manifest["facts"] // manifest["shard_size"])
        for k in range(n):
            t = pq.read_table(pa.BufferReader(read(f"{directory}/shard-{k:05d}-of-{n:05d}.parquet")),
                              columns=["id", "R"]).to_pydict()
            rows.update(zip(t["id"], t["R"]))
    return rows


def test_two_processes_on_a_bucket_match_one_on_a_local_disk(gcs, tmp_path):
    config = tiny_experiment(tmp_path)
    local, remote = tmp_path / "one", f"gs://{BUCKET}/two"
    finish(launch("jaxsft.run", [f"--config={config}", f"--workdir={local}"], processes=1))
    logs = finish(launch("jaxsft.run", [f"--config={config}", f"--workdir={remote}"], processes=2))
    assert {m.group(1) for m in BAR.finditer(logs[0])} == {"memorization (likelihood)", "train", "evaluate"}
    assert not BAR.search(logs[1]), logs[1][-2000:]  # one bar per stage: process 0's
    gcs.invalidate_cache()
    one = _scores(lambda name: (local / name).read_bytes())
    two = _scores(lambda name: gcs.cat(f"{BUCKET}/two/{name}"))
    assert one.keys() == two.keys() and len(one) > 20
    np.testing.assert_allclose([two[k] for k in one], list(one.values()), atol=1e-5, rtol=0)
    p1 = load((local / CELL / "model" / "model.safetensors").read_bytes())
    p2 = load(gcs.cat(f"{BUCKET}/two/{CELL}/model/model.safetensors"))
    assert p1.keys() == p2.keys()
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], atol=1e-5, rtol=0, err_msg=name)
    assert gcs.exists(f"{BUCKET}/two/report.md")


def test_sigterm_to_one_host_saves_the_same_step_on_both(tmp_path):
    """Spot preemption of a 2-host job: SIGTERM reaches one process at a random step. Both save the
    step JAX's preemption sync names and exit 0; the resumed job ends bit-identical to one never stopped."""
    config = tiny_experiment(tmp_path, epochs=40, checkpoint_every=0, learning_rate=1e-3)
    rows = [dict(id=f"{r}-{i}", split="train", relation=r, subject="s", question=f"Where is {n}?",
                 answers=[n[::-1]], R=0.5, level=0) for r in ID_RELATIONS for i, n in enumerate(["Ann", "Bob"])]
    args = ["--config.select.level=0", "--config.select.size=8"]
    stopped, reference = tmp_path / "stopped", tmp_path / "reference"
    for workdir in (stopped, reference):
        write_scores(workdir, rows)
    finish(launch("jaxsft.train", [f"--config={config}", f"--workdir={reference}", *args], processes=2))

    procs = launch("jaxsft.train", [f"--config={config}", f"--workdir={stopped}", *args], processes=2)
    tensorboard = stopped / "sft" / "level0-size8-seed0" / "tensorboard"
    deadline = time.monotonic() + 300
    while not list(tensorboard.glob("events.*")):  # the writer opens just before step 0
        assert all(p.poll() is None for p in procs), output(procs[0])[-4000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    time.sleep(random.Random().uniform(0.5, 3.0))
    victim = random.Random().randrange(2)
    procs[victim].send_signal(signal.SIGTERM)
    logs = finish(procs, timeout=300)
    checkpoints = stopped / "sft" / "level0-size8-seed0" / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    assert len(steps) == 1 and 0 < steps[0] < 80, steps
    for log in logs:
        assert f"SIGTERM: saved a checkpoint at step {steps[0]} of 80" in log, log[-3000:]
    assert not (checkpoints.parent / "model").exists()

    logs = finish(launch("jaxsft.train", [f"--config={config}", f"--workdir={stopped}", *args], processes=2))
    assert f"resuming from step {steps[0]} of 80" in logs[0]
    got = load((checkpoints.parent / "model" / "model.safetensors").read_bytes())
    expected = load((reference / "sft" / "level0-size8-seed0" / "model" / "model.safetensors").read_bytes())
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
