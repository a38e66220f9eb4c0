"""The 24 EntityQuestions relations and their role in the paper's experiments.

In-domain (`ID`) relations are the ones fine-tuning data is drawn from; out-of-domain (`OOD`)
relations only ever serve to test generalisation.
"""
from collections.abc import Iterable

ID = "ID"
OOD = "OOD"

ID_RELATIONS: tuple[str, ...] = (
    "P17", "P19", "P20", "P36", "P69", "P131", "P159", "P276", "P495", "P740",
)
OOD_RELATIONS: tuple[str, ...] = (
    "P112", "P127", "P170", "P175", "P176", "P26", "P40",
    "P413", "P50", "P136", "P106", "P264", "P407", "P800",
)
ALL_RELATIONS: tuple[str, ...] = ID_RELATIONS + OOD_RELATIONS

_ROLES = {relation: ID for relation in ID_RELATIONS} | {relation: OOD for relation in OOD_RELATIONS}


def role(relation: str) -> str:
    """`"ID"` or `"OOD"`; raises `ValueError` for a relation outside the 24."""
    return _ROLES[check_relations([relation])[0]]


def check_relations(relations: str | Iterable[str] | None) -> tuple[str, ...]:
    """Normalise a relation selection (`None` = all 24, in `ALL_RELATIONS` order), naming unknown ones."""
    if relations is None:
        return ALL_RELATIONS
    selected = (relations,) if isinstance(relations, str) else tuple(relations)
    unknown = [relation for relation in selected if relation not in _ROLES]
    if unknown:
        raise ValueError(f"unknown relation(s) {unknown}; EntityQuestions has {list(ALL_RELATIONS)}")
    if len(set(selected)) != len(selected):
        raise ValueError(f"relations repeated in {list(selected)}")
    return selected
