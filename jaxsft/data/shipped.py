"""Rebuild the EntityQuestions copy shipped in `jaxsft/data/` from an official directory.

    python -m jaxsft.data.shipped /path/to/entity_questions [--out DIR]

Writes `entity_questions.{train,dev,test}.json.gz` (`{relation: [{question, answers}, ...]}` in
`ALL_RELATIONS` order, records in file order), and copies `LICENSE` and
`relation_query_templates.json`. The output is deterministic: compact JSON, gzip mtime 0.
Every question must parse (`load(..., strict=True)` is run on the source first).
"""
import argparse
import gzip
import json
import shutil
from pathlib import Path

from jaxsft.data.entity_questions import PACKAGE_DIR, QUERY_TEMPLATES_FILE, SPLITS, PathLike, load, read_records

LICENSE_FILE = "LICENSE.entity_questions"


def rebuild(source: PathLike, out_dir: PathLike = PACKAGE_DIR) -> list[Path]:
    """Write the shipped copy of the EntityQuestions directory `source` into `out_dir`; returns the files written."""
    source, out_dir = Path(source), Path(out_dir)
    for required in ("LICENSE", QUERY_TEMPLATES_FILE):
        if not (source / required).is_file():
            raise FileNotFoundError(f"{source / required} is missing; the shipped copy carries it")
    load(source, splits=SPLITS)  # validates every record and subject before anything is written
    written = []
    for split in SPLITS:
        by_relation = {relation: records for relation, _, records in read_records(source, split)}
        text = json.dumps(by_relation, ensure_ascii=False, separators=(",", ":"))
        file = out_dir / f"entity_questions.{split}.json.gz"
        file.write_bytes(gzip.compress(text.encode("utf-8"), compresslevel=9, mtime=0))
        written.append(file)
    for name, target in (("LICENSE", LICENSE_FILE), (QUERY_TEMPLATES_FILE, QUERY_TEMPLATES_FILE)):
        written.append(Path(shutil.copyfile(source / name, out_dir / target)))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="official EntityQuestions directory (train/ dev/ test/ LICENSE templates)")
    parser.add_argument("--out", default=str(PACKAGE_DIR), help="output directory (default: the package)")
    args = parser.parse_args()
    for file in rebuild(args.source, args.out):
        print(f"{file}  {file.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
