"""AOT compile for a TPU slice on the CPU: libtpu's compile-only devices, no TPU, no weights.

`python -m jaxsft.compile` runs in a subprocess: libtpu stays out of the test process, and the exit
code is part of what is tested.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from jaxsft import hardware

TINY = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
# ~6B parameters in two layers: float32 AdamW state alone is ~18 GiB per chip on 4 chips
WIDE = dict(TINY, vocab_size=256000, hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
            num_key_value_heads=8)

needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed (pip install 'jax[tpu]')")


def compile_cli(tmp_path, arch: dict, *args: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(arch))
    out = tmp_path / "report.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "jaxsft.compile", "--config=configs/demo.py", f"--config.model.path={model}",
         "--config.model.scan_layers=True", f"--json={out}", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return proc, json.loads(out.read_text()) if out.exists() else None


@needs_libtpu
def test_tiny_model_compiles_for_v5e_2x2(tmp_path):
    proc, report = compile_cli(tmp_path, TINY, "--topology=v5e:2x2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report["fits"] and report["topology"] == "v5e:2x2" and report["mesh"]["fsdp"] == 4
    assert [s["step"] for s in report["steps"]] == ["train", "score", "decode"]
    for step in report["steps"]:
        assert step["arguments"] > 0 and step["total"] > 0 and step["flops"] > 0, step
        assert step["total"] < report["hbm_bytes"] and step["fits"]
    train = report["steps"][0]
    assert train["aliased"] > 0  # the train state is donated: new params overwrite old ones
    assert "train" in proc.stdout and "fits" in proc.stdout


@needs_libtpu
def test_model_too_big_for_the_slice_fails_with_a_message(tmp_path):
    proc, report = compile_cli(tmp_path, WIDE, "--topology=v5e:2x2", "--steps=train")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: train does not fit a v5e chip" in proc.stderr
    assert report is not None and not report["fits"] and not report["steps"][0]["fits"]


@needs_libtpu
def test_batch_the_slice_cannot_split_is_a_config_error(tmp_path):
    proc, _ = compile_cli(tmp_path, TINY, "--topology=v5e:2x2", "--steps=score", "--config.scoring.batch_size=6")
    assert proc.returncode == 2
    assert "scoring.batch_size=6 is not divisible by the 4 data-parallel devices" in proc.stderr


@pytest.mark.parametrize("name, topology, accelerator, chips", [
    ("v5e-8", "v5e:2x4", "v5litepod-8", 8),
    ("v5litepod-16", "v5e:4x4", "v5litepod-16", 16),
    ("v4-8", "v4:2x2x1", "v4-8", 4),
    ("v4-32", "v4:2x2x4", "v4-32", 16),
    ("v5p-8", "v5:2x2x1", "v5p-8", 4),
    ("v5p-128", "v5:4x4x4", "v5p-128", 64),
    ("v4-64", "v4:2x4x4", "v4-64", 32),
    ("v6e-8", "v6e:2x4", "v6e-8", 8),
    ("v5e:2x2", "v5e:2x2", "v5litepod-4", 4),
    ("v4:2x2x2", "v4:2x2x2", "v4-16", 8),
])
def test_slice_names(name, topology, accelerator, chips):
    s = hardware.parse_slice(name)
    assert (s.topology_name, s.accelerator_type, s.num_chips) == (topology, accelerator, chips)


@pytest.mark.parametrize("name", ["v4-6", "v5e-3", "v7-8", "tpu", "v4:2x2"])
def test_bad_slice_names(name):
    with pytest.raises(ValueError):
        hardware.parse_slice(name)
