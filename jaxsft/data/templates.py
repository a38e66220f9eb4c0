"""Completion templates: declarative prefixes the object completes ("[X] was born in" + " Paris").

The memorization score of a fact is built on the model's probability of `" " + object` right
after `fill(template, subject)`, over the 21 templates of its relation. The templates live in the
editable data file `completion_templates.json` (relation -> 21 strings with one `[X]`).
"""
import os
from pathlib import Path

from jaxsft.data.files import DataFormatError, read_json

from jaxsft.data.relations import ALL_RELATIONS

COMPLETION_TEMPLATES_FILE = Path(__file__).resolve().with_name("completion_templates.json")
TEMPLATES_PER_RELATION = 21
PLACEHOLDER = "[X]"


def fill(template: str, subject: str) -> str:
    """`template` with its single `[X]` replaced by `subject`."""
    if template.count(PLACEHOLDER) != 1:
        raise ValueError(f"template must contain {PLACEHOLDER} exactly once: {template!r}")
    return template.replace(PLACEHOLDER, subject)


def completion_templates(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Relation -> its 21 completion templates, validated (default: the packaged file)."""
    file = Path(path) if path is not None else COMPLETION_TEMPLATES_FILE
    templates = read_json(file)
    validate_completion_templates(templates, str(file))
    return {relation: templates[relation] for relation in ALL_RELATIONS}


def validate_completion_templates(templates: dict[str, list[str]], source: str = "completion templates") -> None:
    """Raise `DataFormatError` (a `ValueError`) naming the relation and template that break a rule.

    Rules: exactly the 24 relations; per relation exactly 21 distinct strings; each has `[X]`
    exactly once, no leading or trailing whitespace (the scorer appends `" " + object`) and does
    not end a sentence.
    """
    if not isinstance(templates, dict):
        raise DataFormatError(f"{source}: expected an object relation -> list of templates")
    missing = [relation for relation in ALL_RELATIONS if relation not in templates]
    unknown = [relation for relation in templates if relation not in ALL_RELATIONS]
    if missing or unknown:
        raise DataFormatError(f"{source}: missing relations {missing}, unknown relations {unknown}")
    for relation, relation_templates in templates.items():
        if not isinstance(relation_templates, list) or not all(isinstance(t, str) for t in relation_templates):
            raise DataFormatError(f"{source}: {relation}: expected a list of strings")
        if len(relation_templates) != TEMPLATES_PER_RELATION:
            count = len(relation_templates)
            raise DataFormatError(f"{source}: {relation} has {count} templates, expected {TEMPLATES_PER_RELATION}")
        duplicates = sorted({t for t in relation_templates if relation_templates.count(t) > 1})
        if duplicates:
            raise DataFormatError(f"{source}: {relation} repeats {duplicates}")
        for template in relation_templates:
            if template.count(PLACEHOLDER) != 1:
                raise DataFormatError(f"{source}: {relation}: {template!r} must contain {PLACEHOLDER} exactly once")
            if template != template.strip():
                raise DataFormatError(f"{source}: {relation}: {template!r} has leading or trailing whitespace")
            if template.endswith((".", "?", "!")):
                raise DataFormatError(f"{source}: {relation}: {template!r} ends a sentence; the object must continue it")

