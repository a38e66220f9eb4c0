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
import os
import unicodedata
from collections.abc import Iterable
from functools import cache, lru_cache
from pathlib import Path

from jaxsft.data.files import DataFormatError, read_json

ALIASES_FILE = Path(__file__).resolve().with_name("answer_aliases.json")

_ARTICLES = frozenset({"a", "an", "the"})
# Letters NFKD does not decompose into a base letter and a combining mark.
_FOLD = str.maketrans(
    {"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i", "ħ": "h"}
)


def normalize(text: str) -> str:
    """The SQuAD normal form plus accent folding; idempotent.

    Casefold; NFKD without combining marks ("São" -> "sao"), plus the letters NFKD keeps ("ø", "ł");
    punctuation, symbols and control characters become spaces; the words a/an/the go; single spaces.

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
    "New Yorker". An answer inside a longer name still matches ("Mexico" in "New Mexico"):
    matching is containment, not entity linking. Answers that normalise to "" never match.
    """
    padded = f" {normalize(output)} "
    return any(f" {name} " in padded for name in _normal_forms(tuple(answers)))


def aliases(answer: str) -> list[str]:
    """`answer` followed by the other names of its alias group (`[answer]` when it has none).

    The group is found by normal form ("usa" finds "USA"); names with the normal form of `answer` are not repeated.
    """
    key = normalize(answer)
    return [answer, *(name for name in _alias_index().get(key, ()) if normalize(name) != key)]


def expand(answers: Iterable[str]) -> list[str]:
    """The answers (exact repeats dropped), then the aliases whose normal form is not there yet."""
    expanded = list(dict.fromkeys(answers))
    seen = {normalize(answer) for answer in expanded}
    for answer in list(expanded):
        for name in aliases(answer)[1:]:
            if normalize(name) not in seen:
                seen.add(normalize(name))
                expanded.append(name)
    return expanded


def alias_groups(path: str | os.PathLike | None = None) -> list[list[str]]:
    """All alias groups of `answer_aliases.json` (`{category: [[name, ...], ...]}`), validated.

    Every name normalises to a non-empty string that belongs to one group only.
    """
    file = Path(path) if path is not None else ALIASES_FILE
    table = read_json(file)
    if not isinstance(table, dict):
        raise DataFormatError(f"{file}: expected an object category -> list of alias groups")
    groups, owner = [], {}
    for category, category_groups in table.items():
        for group in category_groups:
            if not isinstance(group, list) or len(group) < 2 or not all(isinstance(name, str) for name in group):
                raise DataFormatError(f"{file}: {category}: an alias group is a list of at least two names, got {group!r}")
            for name in group:
                key = normalize(name)
                if not key:
                    raise DataFormatError(f"{file}: {category}: {name!r} normalises to the empty string")
                if key in owner:
                    where = "twice in" if owner[key] is group else f"in {owner[key]!r} and in"
                    raise DataFormatError(f"{file}: {name!r} (normalised {key!r}) is {where} {group!r}")
                owner[key] = group
            groups.append(group)
    return groups


@lru_cache(maxsize=1 << 16)
def _normal_forms(answers: tuple[str, ...]) -> tuple[str, ...]:
    """Non-empty normal forms of the answers and their aliases; cached, scoring asks for the same facts often."""
    return tuple(dict.fromkeys(name for name in map(normalize, expand(answers)) if name))


@cache
def _alias_index() -> dict[str, tuple[str, ...]]:
    return {normalize(name): tuple(group) for group in alias_groups() for name in group}

