"""EntityQuestions data: facts, relation roles, completion templates, answer matching."""
from jaxsft.data.answers import aliases, contains_answer, expand, normalize
from jaxsft.data.entity_questions import (
    FEATURES,
    SPLITS,
    DataFormatError,
    SubjectParseError,
    UnparsedQuestionWarning,
    load,
    parse_subject,
    query_templates,
)
from jaxsft.data.relations import ALL_RELATIONS, ID_RELATIONS, OOD_RELATIONS, role
from jaxsft.data.templates import completion_templates, fill

__all__ = [
    "ALL_RELATIONS",
    "FEATURES",
    "ID_RELATIONS",
    "OOD_RELATIONS",
    "SPLITS",
    "DataFormatError",
    "SubjectParseError",
    "UnparsedQuestionWarning",
    "aliases",
    "completion_templates",
    "contains_answer",
    "expand",
    "fill",
    "load",
    "normalize",
    "parse_subject",
    "query_templates",
    "role",
]
