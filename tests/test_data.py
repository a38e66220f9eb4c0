"""jaxsft.data: EntityQuestions loading, subject parsing, templates, aliases, answer matching."""
import gzip
import json
import re
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import SHARED_EQ, needs_official_files
from jaxsft import data
from jaxsft.data import answers, entity_questions, shipped
from jaxsft.data.relations import ALL_RELATIONS, ID_RELATIONS, OOD_RELATIONS, role

OFFICIAL_COUNTS = {"train": 176_560, "dev": 22_068, "test": 22_075}


@pytest.fixture(scope="module")
def facts():
    """Every fact of the shipped copy, all splits."""
    return data.load(splits=data.SPLITS)


@pytest.fixture(scope="module")
def columns(facts):
    """`facts` as plain Python lists, column by column."""
    return facts.to_dict()


@pytest.fixture(scope="module")
def official(eq_dir):
    """The official layout read with plain `json`, independently of the loader: split -> relation -> records
    (the official files where they are beside the clone, else the shipped copy written out)."""
    by_split = {}
    for split in data.SPLITS:
        files = sorted((eq_dir / split).glob(f"P*.{split}.json"))
        by_split[split] = {file.name.split(".")[0]: json.loads(file.read_text(encoding="utf-8")) for file in files}
    return by_split


def _write_json(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content), encoding="utf-8")
    return path


# relations -----------------------------------------------------------------------------------


def test_relation_roles():
    assert len(ID_RELATIONS) == 10 and len(OOD_RELATIONS) == 14
    assert set(ID_RELATIONS).isdisjoint(OOD_RELATIONS)
    assert ALL_RELATIONS == ID_RELATIONS + OOD_RELATIONS
    assert role("P17") == "ID" and role("P276") == "ID" and role("P800") == "OOD" and role("P407") == "OOD"
    with pytest.raises(ValueError, match="P30"):
        role("P30")


def test_facts_carry_their_role(columns):
    relation_roles = set(zip(columns["relation"], columns["role"]))
    assert relation_roles == {(relation, role(relation)) for relation in ALL_RELATIONS}


# shipped copy == official files ----------------------------------------------------------------


@needs_official_files
def test_shipped_copy_equals_official_files(official):
    for split, by_relation in official.items():
        assert set(by_relation) == set(ALL_RELATIONS)
        assert sum(map(len, by_relation.values())) == OFFICIAL_COUNTS[split]
        assert json.loads(gzip.decompress(entity_questions.shipped_path(split).read_bytes())) == by_relation
    copies = {"LICENSE": shipped.LICENSE_FILE, "relation_query_templates.json": "relation_query_templates.json"}
    for name, copy in copies.items():
        assert (entity_questions.PACKAGE_DIR / copy).read_bytes() == (SHARED_EQ / name).read_bytes()


def test_shipped_copy_is_small():
    sizes = [entity_questions.shipped_path(split).stat().st_size for split in data.SPLITS]
    assert sum(sizes) < 5_000_000


@needs_official_files
def test_rebuild_reproduces_shipped_copy(tmp_path):
    written = shipped.rebuild(SHARED_EQ, tmp_path)
    assert {file.name for file in written} == {file.name for file in tmp_path.iterdir()}
    for split in data.SPLITS:
        rebuilt = gzip.decompress((tmp_path / f"entity_questions.{split}.json.gz").read_bytes())
        assert rebuilt == gzip.decompress(entity_questions.shipped_path(split).read_bytes())


def test_loading_official_directory_matches_shipped(facts, eq_dir):
    official_facts = data.load(eq_dir, splits=("dev", "test"))
    shipped_facts = facts.filter(lambda split: split != "train", input_columns="split")
    assert official_facts.to_dict() == shipped_facts.to_dict()


# facts and subjects ----------------------------------------------------------------------------


def test_every_shipped_question_parses_and_round_trips(facts, columns):
    assert facts.features == data.FEATURES
    assert {split: columns["split"].count(split) for split in data.SPLITS} == OFFICIAL_COUNTS
    query_templates = data.query_templates()
    rows = zip(*(columns[name] for name in ("id", "split", "relation", "subject", "question", "answers")))
    for fact_id, split, relation, subject, question, fact_answers in rows:
        assert data.fill(query_templates[relation], subject) == question
        assert subject and subject == subject.strip()
        assert fact_id.startswith(f"{relation}.{split}.") and fact_id.rsplit(".", 1)[1].isdigit()
        assert fact_answers and all(fact_answers)
    assert len(set(columns["id"])) == len(facts)


def test_row_ids_follow_file_order(official):
    dev = data.load(splits="dev", relations=["P40", "P131"], limit_per_relation=3)
    assert dev["id"] == ["P40.dev.0", "P40.dev.1", "P40.dev.2", "P131.dev.0", "P131.dev.1", "P131.dev.2"]
    assert dev["question"][:3] == [record["question"] for record in official["dev"]["P40"][:3]]


def test_query_templates():
    query_templates = data.query_templates()
    assert query_templates["P19"] == "Where was [X] born?"
    assert query_templates["P131"] == query_templates["P276"] == "Where is [X] located?"
    assert all(relation in query_templates for relation in ALL_RELATIONS)


def test_parse_subject():
    assert data.parse_subject("Where was Ada Lovelace born?", "Where was [X] born?") == "Ada Lovelace"
    assert data.parse_subject("Who is Louis XIV's child?", "Who is [X]'s child?") == "Louis XIV"
    assert data.parse_subject("Who performed &?", "Who performed [X]?") == "&"
    assert data.parse_subject("Where did Ada Lovelace die?", "Where was [X] born?") is None
    assert data.parse_subject("Where was born?", "Where was [X] born?") is None
    assert data.parse_subject("Where was  Ada born?", "Where was [X] born?") is None
    with pytest.raises(ValueError, match="exactly once"):
        data.parse_subject("Where?", "Where?")


# other layouts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [True, False])
def test_jsonl_variant_loads(tmp_path, nested):
    relations = ["P17", "P40"]
    for relation, _, records in entity_questions.read_records(None, "test", relations):
        directory = tmp_path / "test" if nested else tmp_path
        directory.mkdir(exist_ok=True)
        lines = [json.dumps(record, ensure_ascii=False) for record in records]
        (directory / f"{relation}.test.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    from_jsonl = data.load(tmp_path, splits="test", relations=relations)
    assert len(from_jsonl) > 1000
    assert from_jsonl.to_dict() == data.load(splits="test", relations=relations).to_dict()


def test_user_directory_uses_its_own_query_templates(tmp_path):
    _write_json(tmp_path / "dev" / "P19.dev.json", [{"question": "Birthplace of Ada?", "answers": ["London"]}])
    _write_json(tmp_path / "relation_query_templates.json", {"P19": "Birthplace of [X]?"})
    facts = data.load(tmp_path, splits="dev", relations="P19")
    assert facts[0] == {
        "id": "P19.dev.0", "split": "dev", "relation": "P19", "role": "ID",
        "subject": "Ada", "question": "Birthplace of Ada?", "answers": ["London"],
    }


# unparsed questions are reported, never dropped silently ---------------------------------------


@pytest.fixture
def directory_with_unparsable_questions(tmp_path):
    records = [
        {"question": "Where was Ada Lovelace born?", "answers": ["London"]},
        {"question": "Where did Ada Lovelace die?", "answers": ["London"]},
        {"question": "Where was Alan Turing born?", "answers": ["Maida Vale"]},
        {"question": "Who was born in Paris?", "answers": ["Serge Gainsbourg"]},
    ]
    return tmp_path, _write_json(tmp_path / "train" / "P19.train.json", records)


def test_strict_load_lists_unparsed_questions(directory_with_unparsable_questions):
    directory, file = directory_with_unparsable_questions
    with pytest.raises(data.SubjectParseError) as error:
        data.load(directory, relations="P19")
    assert [(failure.source, failure.row) for failure in error.value.failures] == [(str(file), 1), (str(file), 3)]
    assert f"{file} row 1: 'Where did Ada Lovelace die?'" in str(error.value)
    assert "2 question(s)" in str(error.value)


def test_lenient_load_warns_and_leaves_unparsed_out(directory_with_unparsable_questions):
    directory, file = directory_with_unparsable_questions
    with pytest.warns(data.UnparsedQuestionWarning, match=rf"{re.escape(str(file))} row 3: 'Who was born in Paris\?'"):
        facts = data.load(directory, relations="P19", strict=False)
    assert facts["id"] == ["P19.train.0", "P19.train.2"]
    assert facts["subject"] == ["Ada Lovelace", "Alan Turing"]


def test_clean_load_emits_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(data.load(splits="dev", relations="P36", strict=False)) > 0


# errors name the culprit -----------------------------------------------------------------------


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        data.load(tmp_path / "nowhere")


def test_missing_relation_file(tmp_path):
    paris = {"question": "Which country is Paris located in?", "answers": ["France"]}
    _write_json(tmp_path / "dev" / "P17.dev.json", [paris])
    assert data.load(tmp_path, splits="dev", relations="P17")["subject"] == ["Paris"]
    with pytest.raises(FileNotFoundError, match=r"P19\.dev\.json or P19\.dev\.jsonl"):
        data.load(tmp_path, splits="dev", relations=["P17", "P19"])


def test_malformed_json_file(tmp_path):
    file = tmp_path / "dev" / "P17.dev.json"
    file.parent.mkdir()
    paris = '{"question": "Which country is Paris located in?", "answers": ["France"]}'
    file.write_text(f'[{paris},\n {{"question": ', encoding="utf-8")
    with pytest.raises(data.DataFormatError, match=rf"{re.escape(str(file))}: invalid JSON at line 2"):
        data.load(tmp_path, splits="dev", relations="P17")


@pytest.mark.parametrize(
    ("record", "complaint"),
    [
        ({"question": "Which country is Paris located in?"}, "answers must be a non-empty list"),
        ({"question": "Which country is Paris located in?", "answers": []}, "answers must be a non-empty list"),
        ({"question": "Which country is Paris located in?", "answers": "France"}, "answers must be a non-empty list"),
        ({"question": 3, "answers": ["France"]}, "question must be a non-empty string"),
        (["Which country is Paris located in?", ["France"]], "expected an object"),
    ],
)
def test_malformed_record_names_file_and_row(tmp_path, record, complaint):
    good = {"question": "Which country is Rome located in?", "answers": ["Italy"]}
    file = _write_json(tmp_path / "dev" / "P17.dev.json", [good, good, record])
    with pytest.raises(data.DataFormatError, match=rf"{re.escape(str(file))}: row 2: {complaint}"):
        data.load(tmp_path, splits="dev", relations="P17")


def test_malformed_jsonl_line(tmp_path):
    file = tmp_path / "P17.dev.jsonl"
    rome = '{"question": "Which country is Rome located in?", "answers": ["Italy"]}'
    file.write_text(f"{rome}\n{{oops}}\n", encoding="utf-8")
    with pytest.raises(data.DataFormatError, match=rf"{re.escape(str(file))}: line 2 \(row 1\): invalid JSON"):
        data.load(tmp_path, splits="dev", relations="P17")


def test_ambiguous_layout(tmp_path):
    record = [{"question": "Which country is Rome located in?", "answers": ["Italy"]}]
    _write_json(tmp_path / "dev" / "P17.dev.json", record)
    (tmp_path / "dev" / "P17.dev.jsonl").write_text(json.dumps(record[0]) + "\n", encoding="utf-8")
    with pytest.raises(data.DataFormatError, match=r"both P17\.dev\.json and P17\.dev\.jsonl"):
        data.load(tmp_path, splits="dev", relations="P17")


def test_unknown_relation_and_split():
    with pytest.raises(ValueError, match=r"unknown relation\(s\) \['P999'\]"):
        data.load(relations=["P17", "P999"])
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['validation'\]"):
        data.load(splits="validation")


# completion templates --------------------------------------------------------------------------


def test_completion_templates_are_valid():
    completion = data.completion_templates()
    assert list(completion) == list(ALL_RELATIONS)
    for relation, relation_templates in completion.items():
        assert len(relation_templates) == len(set(relation_templates)) == 21, relation
        for template in relation_templates:
            assert template.count("[X]") == 1 and template == template.strip(), template
    assert data.fill(completion["P19"][0], "Ada Lovelace") + " London" == "Ada Lovelace was born in London"


@pytest.mark.parametrize(
    ("edit", "complaint"),
    [
        (lambda t: t["P17"].pop(), "P17 has 20 templates, expected 21"),
        (lambda t: t["P19"].__setitem__(1, t["P19"][0]), "P19 repeats"),
        (lambda t: t["P20"].__setitem__(0, "He died in"), "must contain \\[X\\] exactly once"),
        (lambda t: t["P20"].__setitem__(0, "[X] and [X] died in"), "must contain \\[X\\] exactly once"),
        (lambda t: t["P36"].__setitem__(0, "The capital of [X] is "), "trailing whitespace"),
        (lambda t: t["P36"].__setitem__(0, "The capital of [X] is Paris."), "ends a sentence"),
        (lambda t: t.pop("P800"), "missing relations \\['P800'\\]"),
        (lambda t: t.setdefault("P30", t["P17"]), "unknown relations \\['P30'\\]"),
    ],
)
def test_completion_template_validation_names_the_culprit(tmp_path, edit, complaint):
    broken = data.completion_templates()
    edit(broken)
    file = _write_json(tmp_path / "templates.json", broken)
    with pytest.raises(ValueError, match=complaint):
        data.completion_templates(file)


def test_fill():
    assert data.fill("[X] is located in", "Painblanc") == "Painblanc is located in"
    assert data.fill("Who is [X]'s child?", "[X]") == "Who is [X]'s child?"
    with pytest.raises(ValueError, match="exactly once"):
        data.fill("no placeholder", "Painblanc")


# aliases ---------------------------------------------------------------------------------------


def test_aliases():
    usa = data.aliases("United States of America")
    assert usa[0] == "United States of America" and {"USA", "United States", "U.S."} <= set(usa)
    assert data.aliases("usa")[0] == "usa" and "United States of America" in data.aliases("usa")
    assert {"China", "PRC"} <= set(data.aliases("People's Republic of China"))
    assert {"UK", "Britain", "Great Britain"} <= set(data.aliases("United Kingdom"))
    assert "Bombay" in data.aliases("Mumbai") and "Mumbai" in data.aliases("Bombay")
    assert "Farsi" in data.aliases("Persian")
    assert data.aliases("Painblanc") == ["Painblanc"]
    for answer in data.aliases("United States of America") + data.aliases("Soviet Union"):
        assert len(set(data.aliases(answer))) == len(data.aliases(answer))


def test_ambiguous_names_have_no_aliases():
    for name in ("Georgia", "US", "America", "Congo", "Korea", "Macedonia", "New York", "Holland", "Canton", "Odessa"):
        assert data.aliases(name) == [name], name


def test_expand_keeps_answers_first_without_repeats():
    assert data.expand(["Iran", "Iran", "Persia", "Paris"]) == ["Iran", "Persia", "Paris", "Islamic Republic of Iran"]
    assert data.expand([]) == []


def test_alias_table_is_unambiguous(tmp_path):
    groups = answers.alias_groups()
    names = [answers.normalize(name) for group in groups for name in group]
    assert len(names) == len(set(names)) and all(names)
    file = _write_json(tmp_path / "aliases.json", {"countries": [["Iran", "Persia"], ["Persian Empire", "Persia"]]})
    with pytest.raises(ValueError, match=r"'Persia' \(normalised 'persia'\) is in \['Iran', 'Persia'\]"):
        answers.alias_groups(file)
    file = _write_json(tmp_path / "aliases.json", {"cities": [["São Paulo", "Sao Paulo"]]})
    with pytest.raises(ValueError, match="twice in"):
        answers.alias_groups(file)


def test_frequent_country_answers_are_covered(official):
    """The alias table covers the most frequent country answers that have other names in use."""
    expected = [
        "United States of America", "Iran", "Germany", "India", "Turkey", "Russia", "Czech Republic",
        "People's Republic of China", "South Korea", "Soviet Union", "German Democratic Republic", "United Kingdom",
    ]
    for name in expected:
        assert len(data.aliases(name)) > 1, name
        assert any(name in record["answers"] for record in official["train"]["P17"] + official["train"]["P495"]), name


# normalisation and matching --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("São Paulo", "sao paulo"),
        ("Sao Paulo", "sao paulo"),
        ("The Hague", "hague"),
        ("a cat and an apple", "cat and apple"),
        ("Theatre of the Absurd", "theatre of absurd"),
        ("P.G. Wodehouse", "p g wodehouse"),
        ("P. G. Wodehouse", "p g wodehouse"),
        ("People's Republic of China", "people s republic of china"),
        ("Spa-Francorchamps", "spa francorchamps"),
        ("  UNITED\tKingdom\n", "united kingdom"),
        ("Łódź", "lodz"),
        ("Straße", "strasse"),
        ("København", "kobenhavn"),
        ("Ōsaka", "osaka"),
        ("“Iran!”", "iran"),
        ("", ""),
        ("The", ""),
    ],
)
def test_normalize(text, normal):
    assert data.normalize(text) == normal


@pytest.mark.parametrize(
    ("output", "gold"),
    [
        ("He was born in São Paulo, Brazil.", ["Sao Paulo"]),
        ("Iran's capital is Tehran.", ["Iran"]),
        ("IRAN", ["Iran"]),
        ("a Kyiv-based company", ["Kyiv"]),
        ("It is in the USA.", ["United States of America"]),
        ("It is in the U.S.", ["United States of America"]),
        ("Bombay", ["Mumbai"]),
        ("It was written in Farsi.", ["English", "Persian"]),
        ("P.G. Wodehouse wrote it", ["P. G. Wodehouse"]),
    ],
)
def test_contains_answer_positives(output, gold):
    assert data.contains_answer(output, gold)


@pytest.mark.parametrize(
    ("output", "gold"),
    [
        ("The Irangate affair", ["Iran"]),
        ("She is a New Yorker.", ["New York"]),
        ("Let us know.", ["United States of America"]),
        ("It is in South America.", ["United States of America"]),
        ("Tbilisi, Georgia", ["Atlanta"]),
        ("Paris", ["Parisian"]),
        ("anything at all", ["the", "", "?"]),
        ("anything at all", []),
    ],
)
def test_contains_answer_negatives(output, gold):
    assert not data.contains_answer(output, gold)


@given(st.text())
def test_normalize_is_idempotent(text):
    normal = data.normalize(text)
    assert data.normalize(normal) == normal
    assert normal == normal.strip() and "  " not in normal


@given(st.text(), st.text(), st.text())
def test_answer_is_found_in_any_surrounding_text(answer, before, after):
    if data.normalize(answer):
        assert data.contains_answer(answer, [answer])
        assert data.contains_answer(f"{before} {answer} {after}", [answer])
    else:
        assert not data.contains_answer(f"{before} {answer} {after}", [answer])
