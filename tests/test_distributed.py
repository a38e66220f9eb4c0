"""Multi-process: 2 CPU processes joined by `jax.distributed` (coordinator on localhost) run the
whole experiment on a tiny config and get the scores and trained parameters of a 1-process run."""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file

import hf_models

REPO = pathlib.Path(__file__).resolve().parents[1]
DEVICES = 4  # in all: 4 in one process, or 2 in each of two


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("distributed")
    hf_models.build("llama2", root / "model")
    hf_models.char_tokenizer().save_pretrained(root / "model")
    path = root / "tiny.py"
    path.write_text(f'''
from jaxsft import config

def get_config():
    c = config.default_config()
    c.model.path = {str(root / "model")!r}
    c.data.limit_per_relation = 1
    c.scoring.batch_size = 8
    c.train.update(max_length=96, checkpoint_every=0, batch_size=4)
    c.eval.update(batch_size=8, max_new_tokens=4, buckets=(64, 96))
    c.grid.update(levels=("mixed",), sizes=("8",), seeds=(0,))
    return c
''')
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(config_file: pathlib.Path, workdir: pathlib.Path, processes: int) -> list[str]:
    port = _free_port()
    procs = []
    for i in range(processes):
        env = {**os.environ, "JAX_PLATFORMS": "cpu",
               "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES // processes}"}
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAXSFT_NUM_PROCESSES=str(processes),
                       JAXSFT_PROCESS_ID=str(i))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jaxsft.run", f"--config={config_file}", f"--workdir={workdir}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=900)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


BAR = re.compile(r"(memorization \(\w+\)|train|evaluate): +\d+%\|")  # a tqdm bar of a stage


def _scores(workdir: pathlib.Path) -> dict[str, float]:
    rows = {}
    for directory in (workdir / "memorization", workdir / "test_scores" / "memorization"):
        for f in sorted(directory.glob("*.parquet")):
            t = pq.read_table(f, columns=["id", "R"]).to_pydict()
            rows.update(zip(t["id"], t["R"]))
    return rows


def test_two_processes_match_one(config_file, tmp_path):
    _run(config_file, tmp_path / "one", processes=1)
    logs = _run(config_file, tmp_path / "two", processes=2)
    assert {m.group(1) for m in BAR.finditer(logs[0])} == {"memorization (likelihood)", "train", "evaluate"}
    assert not BAR.search(logs[1]), logs[1][-2000:]  # one bar per stage: process 0's
    one, two = _scores(tmp_path / "one"), _scores(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 20
    np.testing.assert_allclose([two[k] for k in one], list(one.values()), atol=1e-5, rtol=0)
    cell = pathlib.Path("sft") / "levelmixed-size8-seed0" / "model" / "model.safetensors"
    p1, p2 = load_file(tmp_path / "one" / cell), load_file(tmp_path / "two" / cell)
    assert p1.keys() == p2.keys()
    for name in p1:
        np.testing.assert_allclose(p2[name], p1[name], atol=1e-5, rtol=0, err_msg=name)
    assert (tmp_path / "two" / "report.md").exists()
