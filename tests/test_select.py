"""Training-set selection: deterministic, balanced across in-domain relations, level-pure."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
from hypothesis import given, strategies as st

from conftest import write_scores
from jaxsft import config as config_lib
from jaxsft import select
from jaxsft.data.relations import ID_RELATIONS, OOD_RELATIONS

SHORT = ID_RELATIONS[3]  # has only 4 facts of level 2


def scored_rows() -> list[dict]:
    """30 train facts per level for each in-domain relation (4 at level 2 for SHORT), plus OOD and
    test-split facts that must never be selected."""
    rows = []
    for relation in ID_RELATIONS + OOD_RELATIONS[:2]:
        for level in range(5):
            count = 4 if (relation, level) == (SHORT, 2) else 30
            for i in range(count):
                rows.append(dict(id=f"{relation}-{level}-{i}", split="train", relation=relation, subject=f"s{i}",
                                 question=f"q {relation} {level} {i}?", answers=[f"a{i}"],
                                 templates=[0.1 * level] * 3, R=0.2 * level, level=level))
        rows.append(dict(id=f"{relation}-test", split="test", relation=relation, subject="t", question="q?",
                         answers=["a"], templates=[0.0], R=0.0, level=2))
    return rows


@pytest.fixture(scope="module")
def scored() -> datasets.Dataset:
    return datasets.Dataset.from_list(scored_rows())


def per_relation(ds: datasets.Dataset) -> dict[str, int]:
    counts = {}
    for r in ds["relation"]:
        counts[r] = counts.get(r, 0) + 1
    return counts


def test_selection_is_deterministic_and_ignores_row_order(scored):
    a = select.select(scored, 3, 60, seed=0)
    assert a["id"] == select.select(scored, "3", "60", seed=0)["id"]
    assert a["id"] == select.select(scored.shuffle(seed=1), 3, 60, seed=0)["id"]
    assert set(a["id"]) != set(select.select(scored, 3, 60, seed=1)["id"])


def test_balanced_level_pure_in_domain_train_only(scored):
    ds = select.select(scored, 1, 60, seed=0)
    assert per_relation(ds) == dict.fromkeys(ID_RELATIONS, 6)
    assert set(ds["level"]) == {1} and set(ds["split"]) == {"train"}
    assert ds.column_names == scored.column_names


def test_a_short_relation_gives_all_it_has_and_the_rest_is_shared(scored):
    counts = per_relation(select.select(scored, 2, 100, seed=0))
    assert counts[SHORT] == 4 and sum(counts.values()) == 100
    others = [n for r, n in counts.items() if r != SHORT]
    assert max(others) - min(others) <= 1  # 96 over 9 relations: 10 or 11 each


def test_smaller_sets_are_subsets_of_larger_ones(scored):
    small, large = (set(select.select(scored, 0, n, seed=5)["id"]) for n in (60, 240))
    assert small < large


def test_mixed_balances_levels_inside_each_relation(scored):
    ds = select.select(scored, "mixed", 100, seed=0)
    assert per_relation(ds) == dict.fromkeys(ID_RELATIONS, 10)
    levels = [lv for r, lv in zip(ds["relation"], ds["level"]) if r == ID_RELATIONS[0]]
    assert sorted(levels) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_fewer_items_than_requested_takes_all_with_a_warning(scored, caplog):
    with caplog.at_level(logging.WARNING):
        ds = select.select(scored, 2, 1920, seed=0)
    assert len(ds) == 9 * 30 + 4 == len(select.select(scored, 2, "all", seed=0))
    assert "fewer than the 1920 requested" in caplog.text


def test_bad_arguments_are_named(scored):
    with pytest.raises(ValueError, match="level"):
        select.select(scored, 5, 60, seed=0)
    with pytest.raises(ValueError, match="size"):
        select.select(scored, 0, "some", seed=0)


@given(available=st.lists(st.integers(0, 40), min_size=1, max_size=12), size=st.integers(0, 300))
def test_allocate_is_as_equal_as_the_groups_allow(available, size):
    groups = {f"g{i}": n for i, n in enumerate(available)}
    take = select.allocate(groups, size, list(groups))
    assert sum(take.values()) == min(size, sum(available))
    assert all(0 <= take[g] <= groups[g] for g in groups)
    for a in groups:  # a group below another is full, or within one item of it
        for b in groups:
            assert take[a] == groups[a] or take[b] - take[a] <= 1


def test_build_training_set_saves_data_and_manifest(tmp_path):
    write_scores(tmp_path, scored_rows(), shards=2)
    cfg = config_lib.default_config()
    cfg.select.update(level="4", size="60", seed=3)
    ds = select.build_training_set(cfg, tmp_path)
    out = tmp_path / "train_sets" / "level4-size60-seed3"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == 60 and manifest["per_relation"] == dict.fromkeys(ID_RELATIONS, 6)
    assert (manifest["level"], manifest["size"], manifest["seed"], manifest["per_level"]) == ("4", "60", 3, {"4": 60})
    assert ds["id"] == datasets.load_from_disk(str(out))["id"]
    assert select.build_training_set(cfg, tmp_path)["id"] == ds["id"]  # built again: the same set
