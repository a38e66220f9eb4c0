"""Answer normalisation, answer aliases and answer matching, shared by scoring and evaluation.

`normalize` is the SQuAD normalisation (lowercase, no punctuation, no articles a/an/the, single
spaces) plus accent folding, with one deliberate difference: punctuation and symbols become
spaces instead of vanishing, so that "P.G. Wodehouse" and "P. G. Wodehouse", "Iran's" and "Iran",
"Kyiv-based" and "Kyiv" share words. `contains_answer` matches whole-word sequences.

Aliases come from the editable data file `answer_aliases.json`: groups of names of one entity
(first name = the dataset's spelling). A group only holds true synonyms; names whose normal form
is a common word ("US" -> "us") or a part of other names ("America" in "South America") are left
out, since `contains_answer` would match them where they do not name the entity.
"""
import json
import os
import unicodedata
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path

ALIASES_FILE = Path(__file__).resolve().with_name("answer_aliases.json")

_ARTICLES = frozenset({"a", "an", "the"})
# Letters NFKD does not decompose into a base letter and a combining mark.
_FOLD = str.maketrans({"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i", "ħ": "h"})


def normalize(text: str) -> str:
    """Lowercase (casefold), fold accents (NFKD minus combining marks), punctuation and symbols
    to spaces, drop the articles a/an/the, collapse whitespace. Idempotent.

    >>> normalize("The São Paulo F.C.!")
    'sao paulo f c'
    """
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKD", text).casefold())
    chars = []
    for char in text.translate(_FOLD):
        category = unicodedata.category(char)
        if category == "Mn" or category == "Cf":  # combining marks (accents), invisible format characters
            continue
        chars.append(" " if category[0] in "PSZ" or category == "Cc" else char)
    return " ".join(word for word in "".join(chars).split() if word not in _ARTICLES)


def contains_answer(output: str, answers: Iterable[str]) -> bool:
    """Whether the normalised `output` contains a normalised answer or alias as a whole-word sequence.

    Both sides are normalised and compared with a space on each side, so "Iran" matches
    "Iran's capital" and "born in Iran." but not "Irangate", and "New York" does not match
    "New Yorker". A contained multi-word name still matches ("Mexico" in "New Mexico"): matching
    is containment, not entity linking. Answers that normalise to "" never match.
    """
    padded = f" {normalize(output)} "
    return any(name and f" {name} " in padded for name in map(normalize, expand(answers)))


def aliases(answer: str) -> list[str]:
    """`answer` followed by the other names of its alias group (`[answer]` when it has none)."""
    group = _alias_index().get(normalize(answer), ())
    return _unique([answer, *group])


def expand(answers: Iterable[str]) -> list[str]:
    """The answers, then their aliases, without repeats (exact strings; the order is kept)."""
    answers = list(answers)
    return _unique(answers + [name for answer in answers for name in aliases(answer)])


def alias_groups(path: str | os.PathLike | None = None) -> list[list[str]]:
    """All alias groups of `answer_aliases.json` (`{category: [[name, ...], ...]}`), validated.

    Every name normalises to a non-empty string that belongs to one group only.
    """
    file = Path(path) if path is not None else ALIASES_FILE
    with open(file, encoding="utf-8") as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}") from None
    if not isinstance(table, dict):
        raise ValueError(f"{file}: expected an object category -> list of alias groups")
    groups, owner = [], {}
    for category, category_groups in table.items():
        for group in category_groups:
            if not isinstance(group, list) or len(group) < 2 or not all(isinstance(name, str) for name in group):
                raise ValueError(f"{file}: {category}: an alias group is a list of at least two names, got {group!r}")
            for name in group:
                key = normalize(name)
                if not key:
                    raise ValueError(f"{file}: {category}: {name!r} normalises to the empty string")
                if key in owner:
                    where = "twice in" if owner[key] is group else f"in {owner[key]!r} and in"
                    raise ValueError(f"{file}: {name!r} (normalised {key!r}) is {where} {group!r}")
                owner[key] = group
            groups.append(group)
    return groups


@cache
def _alias_index() -> dict[str, tuple[str, ...]]:
    return {normalize(name): tuple(group) for group in alias_groups() for name in group}


def _unique(names: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(names))
