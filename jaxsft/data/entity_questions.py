"""EntityQuestions: loading, subject recovery, role tagging.

Three sources hold the same facts:

- the copy shipped in this package (`path=None`, the default; see `jaxsft/data/README.md`),
- the official layout: `<root>/<split>/P<n>.<split>.json`, each a JSON list of `{question, answers}`,
- a jsonl variant: `P<n>.<split>.jsonl` with one `{question, answers}` object per line,
  in `<root>/<split>/` or directly in `<root>/`.

Every question is an instance of its relation's query template ("Where was [X] born?"), so the
subject is recovered by stripping the template's text around `[X]`. Questions that do not match
are never dropped silently: `load` raises `SubjectParseError` listing them (file and row), or, with
`strict=False`, warns with the same list and leaves them out.
"""
import json
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
from datasets.table import InMemoryTable

from jaxsft.data.files import DataFormatError, decode_utf8, read_json
from jaxsft.data.relations import check_relations, role
from jaxsft.data.templates import PLACEHOLDER

SPLITS: tuple[str, ...] = ("train", "dev", "test")
PACKAGE_DIR = Path(__file__).resolve().parent
QUERY_TEMPLATES_FILE = "relation_query_templates.json"

FEATURES = datasets.Features({
    "id": datasets.Value("string"),
    "split": datasets.Value("string"),
    "relation": datasets.Value("string"),
    "role": datasets.Value("string"),
    "subject": datasets.Value("string"),
    "question": datasets.Value("string"),
    "answers": datasets.List(datasets.Value("string")),
})

PathLike = str | os.PathLike


@dataclass(frozen=True)
class ParseFailure:
    """A question that does not match its relation's query template."""

    source: str
    row: int
    question: str


class SubjectParseError(DataFormatError):
    """Raised by `load(strict=True)`; `failures` lists every question that did not parse."""

    def __init__(self, failures: Sequence[ParseFailure]):
        self.failures = tuple(failures)
        super().__init__(_describe(self.failures))


class UnparsedQuestionWarning(UserWarning):
    """Emitted by `load(strict=False)` when questions were left out because they did not parse."""


def shipped_path(split: str) -> Path:
    """The gzipped JSON of one split in the shipped copy: `{relation: [{question, answers}, ...]}`."""
    return PACKAGE_DIR / f"entity_questions.{_check_splits(split)[0]}.json.gz"


def parse_subject(question: str, template: str) -> str | None:
    """The subject `[X]` stands for in `question`, or None when the question is not an instance of `template`.

    A subject is non-empty and carries no surrounding whitespace, so `fill(template, subject) == question`.
    """
    prefix, placeholder, suffix = template.partition(PLACEHOLDER)
    if not placeholder or PLACEHOLDER in suffix:
        raise ValueError(f"template must contain {PLACEHOLDER} exactly once: {template!r}")
    if len(question) <= len(prefix) + len(suffix):
        return None
    if not (question.startswith(prefix) and question.endswith(suffix)):
        return None
    subject = question[len(prefix):len(question) - len(suffix)]
    return subject if subject.strip() == subject else None


def query_templates(path: PathLike | None = None) -> dict[str, str]:
    """Relation -> question template with `[X]` (`relation_query_templates.json`).

    `path` is an EntityQuestions directory; when it has no templates file (the official
    `dataset.zip` does not), the shipped copy of the repository's file is used.
    """
    file = _query_templates_file(path)
    templates = read_json(file)
    if not isinstance(templates, dict):
        raise DataFormatError(f"{file}: expected an object relation -> template, got {type(templates).__name__}")
    for relation, template in templates.items():
        if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
            raise DataFormatError(f"{file}: {relation}: expected a string with one {PLACEHOLDER}, got {template!r}")
    return templates


def load(
    path: PathLike | None = None,
    splits: str | Sequence[str] = ("train",),
    relations: str | Iterable[str] | None = None,
    limit_per_relation: int | None = None,
    strict: bool = True,
) -> datasets.Dataset:
    """EntityQuestions facts as an in-memory `datasets.Dataset` with columns `FEATURES`.

    Args:
        path: an EntityQuestions directory (official or jsonl layout); None for the shipped copy.
        splits: any of "train", "dev", "test".
        relations: relation ids (default: all 24, in `ALL_RELATIONS` order).
        limit_per_relation: keep the first rows of each (split, relation) file.
        strict: raise `SubjectParseError` on questions that do not match their template;
            otherwise warn (`UnparsedQuestionWarning`) listing them and leave them out.

    Row ids are `f"{relation}.{split}.{row}"`, `row` being the position in the source file.
    """
    splits = _check_splits(splits)
    relations = check_relations(relations)
    if limit_per_relation is not None and limit_per_relation < 0:
        raise ValueError(f"limit_per_relation must be >= 0, got {limit_per_relation}")
    templates = query_templates(path)
    missing = [relation for relation in relations if relation not in templates]
    if missing:
        raise DataFormatError(f"{_query_templates_file(path)}: no query template for {missing}")

    columns: dict[str, list[Any]] = {name: [] for name in FEATURES}
    failures: list[ParseFailure] = []
    for split in splits:
        for relation, source, records in _read_split(path, split, relations):
            template, relation_role = templates[relation], role(relation)
            for row, record in enumerate(records[:limit_per_relation]):
                question, answers = _check_record(record, source, row)
                subject = parse_subject(question, template)
                if subject is None:
                    failures.append(ParseFailure(source, row, question))
                    continue
                columns["id"].append(f"{relation}.{split}.{row}")
                columns["split"].append(split)
                columns["relation"].append(relation)
                columns["role"].append(relation_role)
                columns["subject"].append(subject)
                columns["question"].append(question)
                columns["answers"].append(answers)
    if failures:
        if strict:
            raise SubjectParseError(failures)
        warnings.warn(_describe(failures) + "\nThey are left out.", UnparsedQuestionWarning, stacklevel=2)
    table = pa.table(columns, schema=FEATURES.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=FEATURES))


def read_records(
    path: PathLike | None, split: str, relations: Iterable[str] | None = None
) -> Iterator[tuple[str, str, list]]:
    """`(relation, source, records)` per relation, records as stored (`{question, answers}` dicts), unchecked."""
    return _read_split(path, _check_splits(split)[0], check_relations(relations))


def _query_templates_file(path: PathLike | None) -> Path:
    if path is not None and (Path(path) / QUERY_TEMPLATES_FILE).is_file():
        return Path(path) / QUERY_TEMPLATES_FILE
    return PACKAGE_DIR / QUERY_TEMPLATES_FILE


def _read_split(path: PathLike | None, split: str, relations: Sequence[str]) -> Iterator[tuple[str, str, list]]:
    if path is None:
        file = shipped_path(split)
        by_relation = read_json(file)
        if not isinstance(by_relation, dict):
            raise DataFormatError(f"{file}: expected an object relation -> records, got {type(by_relation).__name__}")
        for relation in relations:
            if relation not in by_relation:
                raise DataFormatError(f"{file}: relation {relation} is missing")
            yield relation, f"{file}[{relation}]", _check_list(by_relation[relation], f"{file}[{relation}]")
        return
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"EntityQuestions directory not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"EntityQuestions path is not a directory: {root}")
    directory = root / split if (root / split).is_dir() else root
    for relation in relations:
        file = _find_file(directory, relation, split)
        records = _read_jsonl(file) if file.suffix == ".jsonl" else read_json(file)
        yield relation, str(file), _check_list(records, str(file))


def _find_file(directory: Path, relation: str, split: str) -> Path:
    candidates = [directory / f"{relation}.{split}.{ext}" for ext in ("json", "jsonl")]
    found = [file for file in candidates if file.is_file()]
    if not found:
        raise FileNotFoundError(f"no {candidates[0].name} or {candidates[1].name} in {directory}")
    if len(found) > 1:
        raise DataFormatError(f"both {found[0].name} and {found[1].name} in {directory}; keep one")
    return found[0]


def _read_jsonl(file: Path) -> list:
    records = []
    for line_number, line in enumerate(decode_utf8(file.read_bytes(), file).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            where = f"line {line_number} (row {len(records)})"
            raise DataFormatError(f"{file}: {where}: invalid JSON: {error.msg}") from None
    return records


def _check_list(records: Any, source: str) -> list:
    if not isinstance(records, list):
        raise DataFormatError(f"{source}: expected a list of records, got {type(records).__name__}")
    return records


def _check_record(record: Any, source: str, row: int) -> tuple[str, list[str]]:
    if not isinstance(record, dict):
        raise DataFormatError(f"{source}: row {row}: expected an object with question and answers, got {record!r:.80}")
    question, answers = record.get("question"), record.get("answers")
    if not isinstance(question, str) or not question.strip():
        raise DataFormatError(f"{source}: row {row}: question must be a non-empty string, not blank, got {question!r:.80}")
    if not isinstance(answers, list) or not answers:
        raise DataFormatError(f"{source}: row {row}: answers must be a non-empty list of strings, got {answers!r:.80}")
    for k, answer in enumerate(answers):
        if not isinstance(answer, str) or not answer.strip():
            raise DataFormatError(f"{source}: row {row}: answers[{k}] must be a non-blank string, got {answer!r:.80}")
    return question, answers


def _check_splits(splits: str | Sequence[str]) -> tuple[str, ...]:
    selected = (splits,) if isinstance(splits, str) else tuple(splits)
    unknown = [split for split in selected if split not in SPLITS]
    if unknown:
        raise ValueError(f"unknown split(s) {unknown}; EntityQuestions has {list(SPLITS)}")
    if not selected or len(set(selected)) != len(selected):
        raise ValueError(f"splits must be distinct and at least one, got {list(selected)}")
    return selected


def _describe(failures: Sequence[ParseFailure], shown: int = 20) -> str:
    lines = [f"  {failure.source} row {failure.row}: {failure.question!r}" for failure in failures[:shown]]
    if len(failures) > shown:
        lines.append(f"  ... and {len(failures) - shown} more")
    return f"{len(failures)} question(s) do not match their relation's query template:\n" + "\n".join(lines)
