"""Stage contracts on a real workdir: provenance between stages, reruns, nothing earlier touched.

Each case runs a stage's CLI in this process (`<stage>.main(argv)` returns the exit status) and
asserts the one-line error and exit 2, or that the stage was a no-op, or that earlier outputs are
unchanged.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

import hf_models
from conftest import tiny_experiment
from jaxsft import evaluate, run, score, select, train
from jaxsft.training import checkpoint


def _stamps(root: pathlib.Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def _call(capsys, stage, *args) -> tuple[int, str]:
    status = stage.main([stage.__name__, *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    return status, lines[-1] if lines else ""


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny experiment, its config file, and a second model of the same shape."""
    root = tmp_path_factory.mktemp("contracts")
    config = tiny_experiment(root, batch_size=8, epochs=3, checkpoint_every=1, keep_checkpoints=2)
    assert run.main(["run", f"--config={config}", f"--workdir={root / 'exp'}"]) == 0
    hf_models.build("llama2", root / "other", seed=1)
    hf_models.char_tokenizer().save_pretrained(root / "other")
    return root, config


@pytest.fixture
def exp(finished, tmp_path):
    root, config = finished
    shutil.copytree(root / "exp", tmp_path / "exp")
    return tmp_path / "exp", config, root / "other"


CELL = ("--config.select.level=mixed", "--config.select.size=8")


def test_score_on_a_finished_workdir_is_a_no_op(exp, capsys):
    workdir, config, _ = exp
    before = _stamps(workdir)
    assert _call(capsys, score, f"--config={config}", f"--workdir={workdir}", "--config.data.relations=id")[0] == 0
    assert _stamps(workdir) == before


def test_score_with_another_model_is_refused(exp, capsys):
    workdir, config, other = exp
    before = _stamps(workdir)
    status, line = _call(capsys, score, f"--config={config}", f"--workdir={workdir}", "--config.data.relations=id",
                         f"--config.model.path={other}")
    assert status == 2 and "holds scores of another run" in line and "model.weights_sha256" in line
    assert _stamps(workdir) == before


def test_rerun_with_another_model_never_relabels_results(exp, capsys):
    workdir, config, other = exp
    before = _stamps(workdir)
    status, line = _call(capsys, run, f"--config={config}", f"--workdir={workdir}", f"--config.model.path={other}")
    assert status == 2 and "holds scores of another run" in line
    assert _stamps(workdir) == before


def test_facts_scored_by_one_model_do_not_train_another(exp, capsys):
    workdir, config, other = exp
    shutil.rmtree(workdir / "train_sets")
    status, line = _call(capsys, train, f"--config={config}", f"--workdir={workdir}", *CELL,
                         f"--config.model.path={other}")
    assert status == 2 and "scored with another model" in line and str(other) in line
    assert not (workdir / "train_sets").exists()


def test_a_training_set_is_never_replaced(exp, capsys):
    workdir, config, _ = exp
    name = "levelmixed-size8-seed0"
    before = _stamps(workdir / "train_sets")
    assert _call(capsys, select, f"--config={config}", f"--workdir={workdir}", *CELL)[0] == 0  # the same set
    shard = workdir / "memorization" / "shard-00000-of-00001.parquet"
    damaged = workdir / "damaged"
    shutil.copytree(workdir, damaged)
    import pyarrow.parquet as pq

    table = pq.read_table(damaged / shard.relative_to(workdir))
    pq.write_table(table.slice(0, table.num_rows - 3), damaged / shard.relative_to(workdir))  # fewer facts now
    status, line = _call(capsys, select, f"--config={config}", f"--workdir={damaged}", *CELL)
    assert status == 2 and f"train_sets/{name} was selected from other scores" in line and "is kept" in line
    assert _stamps(workdir / "train_sets") == before
    assert _stamps(damaged / "train_sets") == before


def test_a_checkpoint_of_another_model_is_not_resumed(exp, capsys):
    workdir, config, other = exp
    cell = workdir / "sft" / "levelmixed-size8-seed0"
    shutil.rmtree(cell / "model")
    shutil.rmtree(workdir / "train_sets")
    (cell / "train_summary.json").unlink()
    (workdir / "memorization" / "manifest.json").write_text(json.dumps(
        {k: v for k, v in json.loads((workdir / "memorization" / "manifest.json").read_text()).items()
         if k != "model"}))  # scores of unrecorded provenance: only the checkpoint can tell
    status, line = _call(capsys, train, f"--config={config}", f"--workdir={workdir}", *CELL,
                         f"--config.model.path={other}")
    assert status == 2 and "trained on another model" in line and "model_sha256" in line


def test_an_evaluation_of_other_settings_is_kept(exp, capsys):
    workdir, config, _ = exp
    metrics = workdir / "sft" / "levelmixed-size8-seed0" / "eval" / "metrics.json"
    before = metrics.read_bytes()
    assert _call(capsys, evaluate, f"--config={config}", f"--workdir={workdir}", *CELL) == (0, "")  # same: rewritten
    assert json.loads(metrics.read_text())["accuracy"] == json.loads(before)["accuracy"]
    status, line = _call(capsys, evaluate, f"--config={config}", f"--workdir={workdir}", *CELL,
                         "--config.eval.max_new_tokens=3")
    assert status == 2 and "holds an evaluation with other settings" in line and "eval.max_new_tokens" in line
    assert json.loads(metrics.read_text())["settings"]["eval"]["max_new_tokens"] == 4


def test_a_stray_shard_is_not_counted(exp):
    workdir, _, _ = exp
    scores = workdir / "test_scores" / "memorization"
    count = score.read_rows(workdir, "test").num_rows
    shutil.copy(scores / "shard-00000-of-00001.parquet", scores / "shard-00000-of-00001 (copy).parquet")
    shutil.copy(scores / "shard-00000-of-00001.parquet", scores / "part-0.parquet")
    assert score.read_rows(workdir, "test").num_rows == count
    assert len(evaluate.load_test_items(workdir)) == count


def test_a_step_that_goes_bad_twice_is_set_aside_twice(exp, caplog):
    workdir, _, _ = exp
    directory = workdir / "sft" / "levelmixed-size8-seed0" / "checkpoints"
    latest = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
    ckpts = checkpoint.Checkpoints(directory, keep=2)
    try:
        for _ in range(2):
            shutil.copytree(directory / str(latest), directory / "spare", dirs_exist_ok=True)
            ckpts._set_aside([latest])
            shutil.move(directory / "spare", directory / str(latest))
            ckpts.manager.reload()
    finally:
        ckpts.close()
    aside = directory.parent / "checkpoints.unreadable"
    assert sorted(p.name for p in aside.iterdir()) == [str(latest), f"{latest}.1"]


@pytest.mark.parametrize("damaged, stage, names", [
    ("train_sets/levelmixed-size8-seed0/manifest.json", select, "train_sets/levelmixed-size8-seed0/manifest.json is damaged"),
    ("memorization/manifest.json", score, "memorization/manifest.json is damaged"),
    ("test_scores/memorization/shard-00000-of-00001.parquet", evaluate, "shard-00000-of-00001.parquet is damaged"),
])
def test_a_damaged_file_is_named(exp, capsys, damaged, stage, names):
    workdir, config, _ = exp
    path = workdir / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated by a crash of another tool
    args = ["--config.data.relations=id"] if stage is score else list(CELL)
    status, line = _call(capsys, stage, f"--config={config}", f"--workdir={workdir}", *args)
    assert status == 2 and names in line and "move it away" in line
