"""The experiment directory, on a local disk or in a `gs://` bucket: its layout and every write to it.

    <root>/
      memorization/                  scores of the training facts   (score)
      test_scores/memorization/      scores of the test facts       (score)
      train_sets/<set>/              training sets                  (select)
      baseline/eval/                 the model before fine-tuning   (evaluate)
      sft/<set>/                     one grid cell                  (train, evaluate)
        config.json  train_summary.json  checkpoints/  tensorboard/  model/  adapter/  eval/
      report.md  *.png  timings.json                                (report)

Every stage reaches its files through a `Workdir`; none builds a path from a string literal.
Writes are atomic and replace what they overwrite: on a local disk a file is written beside its
destination and renamed over it (`os.replace`); on an object store one upload creates the final
object whole. A directory (a training set, an exported model) is filled in a local scratch
directory, then renamed into place locally, or uploaded with its `marker` file last (`publish`): a
reader takes it as complete when the marker exists. In a multi-process job only process 0 writes; the
others compute the same values and return.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import pyarrow as pa
import pyarrow.parquet as pq
from etils import epath

from jaxsft.errors import UserError

MEMORIZATION = "memorization"
TEST_SCORES = "test_scores"
TRAIN_SETS = "train_sets"
SFT = "sft"
BASELINE = "baseline"
MODEL = "model"
ADAPTER = "adapter"
EVAL = "eval"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"


def is_remote(path: str | os.PathLike) -> bool:
    """Whether `path` names an object store (`gs://...`) rather than the local file system."""
    return "://" in os.fspath(path)


def is_writer() -> bool:
    """One process writes shared outputs; the others compute the same values and wait."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process gets here (a no-op in a single-process job)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class Workdir:
    """A directory of the experiment (the root or one below it) and the files it holds."""

    def __init__(self, root: str | os.PathLike):
        root = os.fspath(root)
        self.root = epath.Path(root if is_remote(root) else os.path.abspath(os.path.expanduser(root)))

    def __repr__(self) -> str:
        return f"Workdir({os.fspath(self.root)!r})"

    def __fspath__(self) -> str:
        return os.fspath(self.root)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Workdir) and os.fspath(self.root) == os.fspath(other.root)

    def __hash__(self) -> int:
        return hash(os.fspath(self.root))

    @property
    def remote(self) -> bool:
        return is_remote(self.root)

    # ------------------------------------------------------------------------------------ layout

    def sub(self, *parts: str) -> Workdir:
        return Workdir(self.root.joinpath(*parts))

    def path(self, *parts: str) -> epath.Path:
        return self.root.joinpath(*parts)

    def scores(self, split: str = "train") -> Workdir:
        """Where the scores of `split`'s facts go: `memorization/`, or `test_scores/memorization/`."""
        return self.sub(MEMORIZATION) if split == "train" else self.sub(TEST_SCORES, MEMORIZATION)

    def train_set(self, name: str) -> Workdir:
        return self.sub(TRAIN_SETS, name)

    def cell(self, name: str) -> Workdir:
        return self.sub(SFT, name)

    def baseline(self) -> Workdir:
        """The model before fine-tuning, evaluated as the cells are (`eval/`)."""
        return self.sub(BASELINE)

    # ------------------------------------------------------------------------------------- reads

    def exists(self, *parts: str) -> bool:
        return self.path(*parts).exists()

    def glob(self, pattern: str) -> list[epath.Path]:
        """Files of this directory matching `pattern`, sorted by name; hidden (scratch) files left out."""
        if not self.root.exists():
            return []
        return sorted((p for p in self.root.glob(pattern) if not p.name.startswith(".")), key=lambda p: p.name)

    def read_text(self, *parts: str) -> str:
        return self.path(*parts).read_text()

    def read_json(self, *parts: str) -> Any:
        try:
            return json.loads(self.read_text(*parts))
        except ValueError as e:  # truncated or not UTF-8: a damaged file, not a bug
            raise UserError(f"{self.path(*parts)} is damaged ({e}); move it away and run the stage again") from e

    def read_parquet(self, files: Sequence[epath.Path], columns: Sequence[str] | None = None) -> list[pa.Table]:
        tables = []
        for f in files:
            try:
                tables.append(pq.read_table(pa.BufferReader(f.read_bytes()), columns=columns))
            except pa.ArrowException as e:
                raise UserError(f"{f} is damaged ({e}); move it away and run the stage again") from e
        return tables

    # ------------------------------------------------------------------------------------ writes

    def write_bytes(self, name: str, data: bytes) -> epath.Path:
        """Write `name` (a path relative to this directory) atomically; only process 0 writes."""
        path = self.path(name)
        if not is_writer():
            return path
        if self.remote:
            path.write_bytes(data)  # an object appears whole when its upload ends
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return path

    def write_text(self, name: str, text: str) -> epath.Path:
        return self.write_bytes(name, text.encode())

    def write_json(self, name: str, obj: Any) -> epath.Path:
        return self.write_text(name, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")

    def write_parquet(self, name: str, table: pa.Table) -> epath.Path:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        return self.write_bytes(name, buffer.getvalue())

    def write_figure(self, name: str, figure: Any, dpi: int = 110) -> epath.Path:
        """A matplotlib figure as PNG; the figure is closed."""
        import matplotlib.pyplot as plt

        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=dpi)
        plt.close(figure)
        return self.write_bytes(name, buffer.getvalue())

    def publish(self, fill: Callable[[pathlib.Path], Any], marker: str) -> Workdir:
        """Make this directory what `fill` writes into a local scratch directory.

        Every process calls `fill` (it may run collectives, as an export does); process 0 publishes.
        An existing directory is replaced as a whole. `marker`, a file `fill` writes, goes up last.
        """
        with self._scratch() as local:
            fill(local)
            if not is_writer():
                return self
            if not (local / marker).is_file():
                raise RuntimeError(f"{fill} wrote no {marker} into {local}")
            if self.remote:
                if self.root.exists():
                    self.root.rmtree()
                files = sorted(p for p in local.rglob("*") if p.is_file())
                for f in sorted(files, key=lambda f: f.relative_to(local) == pathlib.Path(marker)):
                    with f.open("rb") as src, self.path(f.relative_to(local).as_posix()).open("wb") as dst:
                        shutil.copyfileobj(src, dst, 8 << 20)
            else:
                if self.root.exists():
                    aside = self.root.parent / f".{self.root.name}.old-{os.getpid()}"
                    os.replace(self.root, aside)
                    shutil.rmtree(aside)
                os.replace(local, self.root)
        return self

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[pathlib.Path]:
        """A local directory to fill: beside this one on a local disk (so that a rename publishes it),
        in the system's temporary space for a bucket. Removed on exit unless published."""
        if self.remote:
            with tempfile.TemporaryDirectory(prefix="jaxsft-") as tmp:
                yield pathlib.Path(tmp)
            return
        parent = pathlib.Path(self.root).parent
        parent.mkdir(parents=True, exist_ok=True)
        local = pathlib.Path(tempfile.mkdtemp(prefix=f".{self.root.name}.", dir=parent))
        try:
            yield local
        finally:
            shutil.rmtree(local, ignore_errors=True)

    @contextlib.contextmanager
    def local_copy(self) -> Iterator[pathlib.Path]:
        """This directory on the local disk: itself, or a temporary download of a bucket's copy."""
        if not self.remote:
            yield pathlib.Path(self.root)
            return
        with tempfile.TemporaryDirectory(prefix="jaxsft-") as tmp:
            for f in self.root.rglob("*"):
                if f.is_file():
                    dest = pathlib.Path(tmp, os.path.relpath(os.fspath(f), os.fspath(self.root)))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(f.read_bytes())
            yield pathlib.Path(tmp)

    def remove(self, name: str) -> None:
        """Delete the file `name` if it is there (process 0 only)."""
        path = self.path(name)
        if is_writer() and path.exists():
            path.unlink()
