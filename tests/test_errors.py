"""A user's mistake is ONE line on stderr, `error: <what, where, what to do>`, and exit status 2; a bug
is a traceback and exit 1.

Most cases run a stage's CLI in this process (`<stage>.main(argv)` returns the exit status); a few run
`python -m jaxsft.<stage>` in a subprocess, to prove the path a user takes.
"""

from __future__ import annotations

import json
import os
import runpy
import struct
import subprocess
import sys

import pyarrow as pa
import pytest

from conftest import REPO, write_scores
from jaxsft import cli, compile as compile_stage, config as config_lib, evaluate, run, score, select, train
from jaxsft import tokenization
from jaxsft.data import entity_questions
from jaxsft.data.files import DataFormatError, check_schema, check_unique
from jaxsft.errors import UserError
from jaxsft.models import gguf
from jaxsft.models.config import ModelConfig

DEMO = os.fspath(REPO / "configs" / "demo.py")


def error_line(stderr: str) -> str:
    """The one `error:` line; there must be exactly one, and no traceback."""
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


def in_process(capsys, stage, *args: str) -> tuple[int, str]:
    """(exit status, the error line) of `python -m jaxsft.<stage> args`, run in this process."""
    status = stage.main([stage.__name__, *args])
    err = capsys.readouterr().err
    return status, (error_line(err) if status == cli.USAGE_ERROR else err)


# -- config values: every field is checked (type, range) before anything is loaded ---------------------

@pytest.mark.parametrize("override, names", [
    ("train.batch_size=0", "config.train.batch_size = 0: expected an integer >= 1"),
    ("train.learning_rate=-1e-5", "config.train.learning_rate = -1e-05"),
    ("train.epochs=0", "config.train.epochs = 0"),
    ("train.warmup_steps=-1", "config.train.warmup_steps = -1"),
    ("train.max_grad_norm=-1.0", "config.train.max_grad_norm = -1.0"),
    ("train.keep_checkpoints=0", "config.train.keep_checkpoints = 0"),
    ("train.checkpoint_every=-5", "config.train.checkpoint_every = -5"),
    ("train.grad_accum=3", "a divisor of train.batch_size (8)"),
    ("train.b2=1.0", "config.train.b2 = 1.0"),
    ("train.truncation=middle", "config.train.truncation = 'middle': expected one of left, refuse, skip"),
    ("scoring.top_p=1.5", "config.scoring.top_p = 1.5"),
    ("scoring.temperature=0.0", "config.scoring.temperature = 0.0"),
    ("scoring.method=bogus", "config.scoring.method = 'bogus'"),
    ("scoring.buckets=(0,16)", "config.scoring.buckets = (0, 16)"),
    ("model.dtype=float64", "config.model.dtype = 'float64'"),
    ("model.path=", "config.model.path = ''"),
    ("mesh.fsdp=0", "config.mesh.fsdp = 0"),
    ("mesh.data=-1", "config.mesh.fsdp = -1: expected a device count: at most one axis of -1, and mesh.data is -1"),
    ("data.relations=P999", "config.data.relations = 'P999'"),
    ("grid.sizes=(60,-1)", "config.grid.sizes = (60, -1)"),
    ("grid.levels=(7,)", "config.grid.levels = (7,)"),
    ("select.size=0", "config.select.size = '0'"),
    ("eval.max_new_tokens=0", "config.eval.max_new_tokens = 0"),
])
def test_bad_config_value_is_one_line_naming_the_field(override, names, capsys, tmp_path):
    status, line = in_process(capsys, score, f"--config={DEMO}", f"--config.{override}", f"--workdir={tmp_path}")
    assert status == 2
    assert names in line and "fix it in the config file or with --config." in line  # what to do
    assert not list(tmp_path.iterdir())  # nothing was written


# -- flags ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, names", [
    (("--config.train.batch_size=abc",), "--config.train.batch_size=abc: invalid literal for int()"),
    (("--config.train.no_such=1",), "--config.train.no_such: no such field"),
    (("--config.train.learnig_rate=1e-4",), "did you mean train.learning_rate?"),
    (("--config.tran.epochs=1",), "--config.tran: no such field; did you mean train?"),
    (("--bogus=1",), "--bogus: unknown flag"),
    (("stray",), "unexpected argument 'stray'"),
])
def test_bad_flag(args, names, capsys, tmp_path):
    status, line = in_process(capsys, train, f"--config={DEMO}", f"--workdir={tmp_path}", *args)
    assert status == 2 and names in line


@pytest.mark.parametrize("args, names", [
    ((), "--config is required"),
    ((f"--config={DEMO}",), "--workdir is required"),
])
def test_missing_required_flag(args, names, capsys):
    status, line = in_process(capsys, select, *args)
    assert status == 2 and names in line


def test_compile_refuses_unknown_steps_and_needs_a_topology(capsys):
    status, line = in_process(capsys, compile_stage, f"--config={DEMO}", "--topology=v5e-8", "--steps=train,bogus")
    assert status == 2 and "--steps: unknown steps ['bogus']" in line
    status, line = in_process(capsys, compile_stage, f"--config={DEMO}")
    assert status == 2 and "--topology is required" in line


# -- config files --------------------------------------------------------------------------------------

CONFIG_FILES = {
    "misspelt": ("c.train.learnig_rate = 1e-4", "config.train.learnig_rate: no such field; did you mean "
                 "train.learning_rate?"),
    "new_section": ("c.trainer = ml_collections.ConfigDict(dict(epochs=2))", "config.trainer: no such field"),
    "string_number": ('c.train.batch_size = "64"', "{path} line 7: the config file failed: TypeError: "
                      "Could not override field 'batch_size'"),
    "name_error": ("c.train.epochs = undefined", "{path} line 7: the config file failed: NameError"),
    "syntax": ("c.train.epochs = (", "{path} line 7: the config file failed: SyntaxError"),
    # A config built from a plain dict has no type safety: validate names the field and the string.
    "from_dict": ('c = ml_collections.ConfigDict(dict(c.to_dict(), train=dict(c.train.to_dict(), batch_size="64")))',
                  "config.train.batch_size = the string '64': expected an integer >= 1"),
    "lacks_field": ("del c.train['seed']", "config.train.seed: missing"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_FILES))
def test_bad_config_file(case, capsys, tmp_path):
    body, names = CONFIG_FILES[case]
    path = tmp_path / f"{case}.py"
    path.write_text("import ml_collections\nfrom jaxsft import config\n\n\ndef get_config():\n"
                    f"    c = config.default_config()\n    {body}\n    return c\n")
    status, line = in_process(capsys, run, f"--config={path}", f"--workdir={tmp_path / 'w'}")
    assert status == 2 and names.replace("{path}", os.fspath(path)) in line
    assert not (tmp_path / "w").exists()


def test_missing_config_file(capsys, tmp_path):
    status, line = in_process(capsys, score, f"--config={tmp_path}/nope.py", f"--workdir={tmp_path}",
                              "--config.train.epochs=2")
    assert status == 2 and f"--config={tmp_path}/nope.py: no such config file" in line


def test_schema_covers_every_default_field():
    assert set(config_lib.SCHEMA) == set(config_lib.field_names())


def test_print_config_prints_the_resolved_config(capsys, tmp_path):
    assert select.main(["select", f"--config={DEMO}", f"--workdir={tmp_path}", "--config.train.epochs=3",
                        "--print_config"]) == 0
    out = capsys.readouterr().out
    limit = runpy.run_path(DEMO)["get_config"]().data.limit_per_relation  # the demo's own value
    assert "epochs: 3" in out and f"limit_per_relation: {limit}" in out
    assert not list(tmp_path.iterdir())


def test_verbose_adds_the_traceback_and_keeps_status_2(capsys, tmp_path):
    assert score.main(["score", f"--config={DEMO}", f"--workdir={tmp_path}", "--config.train.epochs=0",
                       "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: config.train.epochs = 0")


def test_a_bug_is_a_traceback_and_status_1(capsys, tmp_path):
    def broken(invocation):
        return {}["no such key"]

    assert cli.run_main(cli.Command(broken), ["x", f"--config={DEMO}", f"--workdir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "error:" not in err


def test_a_stage_that_returns_a_value_exits_0(capsys, tmp_path):
    assert cli.run_main(cli.Command(lambda a: object()), ["x", f"--config={DEMO}", f"--workdir={tmp_path}"]) == 0


# -- evaluate: a fine-tuned model is never paired with the default tokenizer -------------------------------

def test_evaluate_without_config_is_refused(capsys, tmp_path):
    status, line = in_process(capsys, evaluate, f"--workdir={tmp_path}")
    assert status == 2 and "--config is required" in line


# -- data files ----------------------------------------------------------------------------------------

GOOD = {"question": "Which country is Paris located in?", "answers": ["France"]}

DATA_ROWS = {
    "question_not_string": ({"question": 3, "answers": ["France"]}, "row 1: question must be a non-empty string"),
    "blank_question": ({"question": "   ", "answers": ["France"]},
                       "row 1: question must be a non-empty string, not blank"),
    "answers_not_list": (dict(GOOD, answers="France"), "row 1: answers must be a non-empty list of strings"),
    "empty_answers": (dict(GOOD, answers=[]), "row 1: answers must be a non-empty list of strings"),
    "blank_answer": (dict(GOOD, answers=["France", " "]), "row 1: answers[1] must be a non-blank string"),
    "answer_not_string": (dict(GOOD, answers=[7]), "row 1: answers[0] must be a non-blank string"),
    "record_not_object": (["Paris", "France"], "row 1: expected an object with question and answers"),
}


@pytest.mark.parametrize("case", sorted(DATA_ROWS))
def test_bad_data_row_names_file_and_row(case, tmp_path):
    record, names = DATA_ROWS[case]
    file = tmp_path / "P17.train.json"
    file.write_text(json.dumps([GOOD, record]))
    with pytest.raises(DataFormatError) as err:
        entity_questions.load(tmp_path, relations=["P17"])
    assert f"{file}: {names}" in str(err.value)
    assert cli.user_message(err.value) == str(err.value)


@pytest.mark.parametrize("suffix", ["json", "jsonl"])
def test_data_file_not_utf8(suffix, tmp_path):
    file = tmp_path / f"P17.train.{suffix}"
    zurich = {"question": "Which country is Zürich located in?", "answers": ["CH"]}
    text = json.dumps(GOOD) + "\n" + json.dumps(zurich, ensure_ascii=False)
    file.write_bytes((text if suffix == "jsonl" else f"[{text.replace(chr(10), ',' + chr(10))}]").encode("latin-1"))
    with pytest.raises(DataFormatError, match=rf"{file}: not UTF-8 text: byte 0xfc at line 2"):
        entity_questions.load(tmp_path, relations=["P17"])


def test_gzipped_data_file_that_is_not_gzip(tmp_path):
    from jaxsft.data.files import read_json

    file = tmp_path / "x.json.gz"
    file.write_bytes(b"[]")
    with pytest.raises(DataFormatError, match=rf"{file}: not a gzip file"):
        read_json(file)


def test_question_off_its_template_is_one_line_naming_file_and_row(tmp_path):
    file = tmp_path / "P17.train.json"
    file.write_text(json.dumps([GOOD, {"question": "Paris is where?", "answers": ["France"]}]))
    with pytest.raises(entity_questions.SubjectParseError) as err:
        entity_questions.load(tmp_path, relations=["P17"])
    line = cli.user_message(err.value)
    assert "\n" not in line and f"{file} row 1: 'Paris is where?'" in line


@pytest.mark.parametrize("table, names", [
    ({"country": [["USA"]]}, "country: an alias group is a list of at least two names, got ['USA']"),
    ({"country": [["USA", "U.S.A."], ["usa", "America"]]}, "'usa' (normalised 'usa') is in ['USA', 'U.S.A.'] and in"),
])
def test_bad_alias_file(table, names, tmp_path):
    from jaxsft.data import answers

    file = tmp_path / "answer_aliases.json"
    file.write_text(json.dumps(table))
    with pytest.raises(DataFormatError) as err:
        answers.alias_groups(file)
    assert str(err.value).startswith(f"{file}: ") and names in str(err.value)


def test_bad_completion_template_file(tmp_path):
    from jaxsft.data import templates

    table = templates.completion_templates()
    table["P17"][3] = "The country of X is"
    file = tmp_path / "completion_templates.json"
    file.write_text(json.dumps(table))
    with pytest.raises(DataFormatError, match=rf"{file}: P17: 'The country of X is' must contain \[X\] exactly once"):
        templates.completion_templates(file)


# -- a model's config.json -------------------------------------------------------------------------------

TINY = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)

MODEL_CONFIGS = {
    "missing_hidden_size": ({"hidden_size": None}, "required key 'hidden_size' is missing"),
    "string_hidden_size": ({"hidden_size": "64"}, "hidden_size = the string '64': expected a positive integer"),
    "zero_layers": ({"num_hidden_layers": 0}, "num_hidden_layers = 0: expected a positive integer"),
    "float_vocab": ({"vocab_size": 96.0}, "vocab_size = 96.0: expected a positive integer"),
    "heads_do_not_divide": ({"hidden_size": 66}, "hidden_size 66 is not divisible by num_attention_heads 4"),
    "kv_heads_do_not_divide": ({"num_key_value_heads": 3},
                               "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    "model_type": ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    "eos_past_vocab": ({"eos_token_id": 500}, "eos_token_id = 500: expected ids below vocab_size (96)"),
    "eos_list": ({"eos_token_id": [2, "x"]}, "eos_token_id = [2, 'x']: expected a token id or a list of them"),
    "tie_string": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings = the string 'yes': expected true or false"),
    "eps_negative": ({"rms_norm_eps": -1e-6}, "rms_norm_eps = -1e-06: expected a positive number"),
    "rope_scaling": ({"rope_scaling": "llama3"}, "rope_scaling = the string 'llama3': expected an object"),
    "rope_type": ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope type 'yarn'"),
    "partial_rotary": ({"partial_rotary_factor": 1.5}, "partial_rotary_factor = 1.5: expected a number in (0, 1]"),
}


@pytest.mark.parametrize("case", sorted(MODEL_CONFIGS))
def test_bad_model_config_names_file_and_key(case):
    change, names = MODEL_CONFIGS[case]
    hf = {k: v for k, v in {**TINY, **change}.items() if v is not None}
    with pytest.raises(UserError) as err:
        ModelConfig.from_hf(hf, source="/models/tiny/config.json")
    assert str(err.value).startswith("/models/tiny/config.json: ") and names in str(err.value)


def test_good_model_config_parses():
    cfg = ModelConfig.from_hf(TINY, source="config.json")
    assert (cfg.head_dim, cfg.num_kv_heads) == (16, 2)


def test_model_dir_config_json_not_json(tmp_path):
    from jaxsft import models

    (tmp_path / "config.json").write_text("{'model_type': 'llama'}")
    with pytest.raises(UserError, match=rf"cannot parse {tmp_path}/config.json"):
        models.from_pretrained(tmp_path)


# -- tokenizer and model vocabulary ----------------------------------------------------------------------

def tiny_tokenizer(n: int):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="w1", name_or_path="tiny")


def test_tokenizer_ids_past_the_models_vocab():
    tok = tiny_tokenizer(120)
    model_cfg = ModelConfig.from_hf(TINY)
    with pytest.raises(UserError) as err:
        tokenization.check_vocab(tok, model_cfg, "runs/x/sft/level0-size60-seed0")
    message = str(err.value)
    assert message.startswith("runs/x/sft/level0-size60-seed0: the tokenizer tiny does not belong to the model")
    assert "'w119' has id 119 (24 token(s) at or past the model's vocab_size 96)" in message
    tokenization.check_vocab(tiny_tokenizer(90), model_cfg, "padded vocabularies are fine")


# -- GGUF headers ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_head(smollm2_gguf) -> bytes:
    with open(smollm2_gguf, "rb") as f:
        return f.read(1 << 20)


GGUF_FILES = {
    "bad_magic": (lambda h: b"GGUX" + h[4:], "not a GGUF file (starts with b'GGUX', expected b'GGUF')"),
    "bad_version": (lambda h: h[:4] + struct.pack("<I", 99) + h[8:], "GGUF version 99 is not supported"),
    "empty": (lambda h: b"", "truncated (0 bytes"),
    "short_header": (lambda h: h[:10], "truncated (10 bytes, shorter than its 24-byte header)"),
    "truncated_tensors": (lambda h: h, "truncated or corrupt"),
    "safetensors_named_gguf": (lambda h: b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "not a GGUF file"),
}


@pytest.mark.parametrize("case", sorted(GGUF_FILES))
def test_bad_gguf_names_the_file(case, gguf_head, tmp_path):
    make, names = GGUF_FILES[case]
    path = tmp_path / "model.gguf"
    path.write_bytes(make(gguf_head))
    with pytest.raises(UserError) as err:
        gguf.open_reader(path)
    assert str(err.value).startswith(f"cannot read GGUF file {path}: ") and names in str(err.value)


@pytest.mark.parametrize("cut, names", [(4, "not a GGUF file"), (10, "truncated GGUF file"),
                                        (4000, "truncated or corrupt GGUF metadata")])
def test_bad_gguf_tokenizer_metadata_names_the_file(cut, names, gguf_head, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(gguf_head[:cut] if cut != 4 else b"PK\x03\x04")
    with pytest.raises(UserError, match=rf"{path}: {names}"):
        tokenization.gguf_metadata(path)


# -- parquet schemas of scored facts -------------------------------------------------------------------------

def scored_table(**changes) -> pa.Table:
    rows = [dict(id=f"P17.train.{i}", split="train", relation="P17", subject="s", question="q?", answers=["a"],
                 template_scores=[0.5], R=0.5, level=2) for i in range(3)]
    table = pa.Table.from_pylist(rows, schema=score.SCHEMA)
    for name, column in changes.items():
        index = table.schema.get_field_index(name)
        table = table.remove_column(index) if column is None else table.set_column(index, name, column)
    return table


@pytest.mark.parametrize("changes, names", [
    (dict(level=None), "missing column(s) ['level']"),
    (dict(R=None, id=None), "missing column(s) ['id', 'R']"),
    (dict(level=pa.array(["2", "2", "2"])), "column 'level' is string, expected int64"),
    (dict(answers=pa.array(["a", "b", "c"])), "column 'answers' is string, expected list<item: string>"),
])
def test_scored_facts_schema(changes, names, tmp_path):
    path = tmp_path / "shard-00000-of-00001.parquet"
    with pytest.raises(DataFormatError) as err:
        check_schema(scored_table(**changes), score.SCHEMA, path)
    assert str(err.value).startswith(f"{path}: ") and names in str(err.value)


def test_scored_facts_schema_keeps_the_expected_columns():
    table = scored_table().append_column("extra", pa.array([1, 2, 3]))
    assert check_schema(table, score.SCHEMA, "x.parquet").schema == score.SCHEMA


def test_duplicate_fact_ids(tmp_path):
    table = scored_table(id=pa.array(["a", "b", "a"]))
    with pytest.raises(DataFormatError, match=r"x.parquet: id 'a' appears twice \(rows 0 and 2\)"):
        check_unique(table, "id", "x.parquet")


# -- the path a user takes: `python -m jaxsft.<stage>` -------------------------------------------------------

def cli_run(stage: str, *args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"jaxsft.{stage}", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=180, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.parametrize("stage, args, names", [
    ("score", ("--config.train.batch_size=0",), "error: config.train.batch_size = 0: expected an integer >= 1"),
    ("train", ("--config.train.keep_checkpoints=0",), "error: config.train.keep_checkpoints = 0"),
    ("run", ("--config.trian.epochs=2",), "error: --config.trian: no such field; did you mean train?"),
    ("evaluate", ("--config.eval.batch_size=x",), "error: --config.eval.batch_size=x: invalid literal"),
    ("compile", ("--topology=v5e-8", "--config.scoring.top_p=2.0"), "error: config.scoring.top_p = 2.0"),
])
def test_cli_user_error_exits_2(stage, args, names, tmp_path):
    workdir = () if stage == "compile" else (f"--workdir={tmp_path}",)
    proc = cli_run(stage, "--config=configs/demo.py", *workdir, *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc.stderr).startswith(names)
    assert not list(tmp_path.iterdir())


def test_cli_select_exits_0_after_selecting(tmp_path):
    """It used to exit 1: absl's app.run got the returned Dataset as the exit status."""
    rows = [dict(id=f"{r}.train.{i}", split="train", relation=r, subject="s", question="q?", answers=["a"],
                 template_scores=[0.0], R=0.0, level=0) for r in ("P17", "P19") for i in range(5)]
    write_scores(tmp_path, rows, shards=1)
    proc = cli_run("select", "--config=configs/demo.py", f"--workdir={tmp_path}", "--config.select.size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((tmp_path / "train_sets" / "level0-size4-seed0" / "manifest.json").read_text())
    assert manifest["count"] == 4


def test_cli_missing_config_file_and_print_config(tmp_path):
    proc = cli_run("score", "--config=configs/nope.py", f"--workdir={tmp_path}")
    assert proc.returncode == 2 and error_line(proc.stderr) == (
        "error: --config=configs/nope.py: no such config file; pass a config file such as configs/demo.py")
    proc = cli_run("train", "--config=configs/demo.py", f"--workdir={tmp_path}", "--print_config")
    assert proc.returncode == 0 and "keep_checkpoints: 2" in proc.stdout and not proc.stderr.count("error:")


def test_cli_bad_data_file_names_file_and_row(tmp_path):
    data = tmp_path / "eq"
    data.mkdir()
    for relation in ("P17", "P19"):
        (data / f"{relation}.train.json").write_text(json.dumps([GOOD] * 2 + [{"question": "", "answers": ["x"]}]))
    proc = cli_run("score", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}", f"--config.data.path={data}",
                   "--config.data.relations=P17,P19")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc.stderr) == (f"error: {data}/P17.train.json: row 2: question must be a non-empty string, "
                                       "not blank, got ''")


def test_cli_bad_model_files(gguf_head, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUX" + gguf_head[4:])
    proc = cli_run("score", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}", f"--config.model.path={bad}",
                   "--config.data.limit_per_relation=1", "--config.data.relations=P17")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert error_line(proc.stderr).startswith(f"error: cannot read GGUF file {bad}: not a GGUF file")
