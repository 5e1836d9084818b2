"""`flame study`'s plan: which arms each part trains, on which splits they are scored, and that an arm
shared by two parts is trained once (and a part not chosen costs nothing)."""

from __future__ import annotations

import pytest

from flame.errors import FlameError
from flame.study.arms import EVERY, LONG, NEGATIVES, SHORT, plan
from flame.study.settings import PARTS, Config, StudySettings


def test_every_part_trains_its_arms_once_and_scores_the_union_of_its_splits():
    s = StudySettings()
    arms, splits, members = plan(s, PARTS)
    names = [a.name for a in arms]
    assert len(names) == len(set(names)) == 14  # 4 sizes x 2 models + 2 long + 3 facet subsets + causal
    assert members["facets"] == ["facets-raw", "facets-short", "facets-long", "flame-4000"]
    assert set(splits["flame-4000"]) == set(EVERY) and len(splits["flame-4000"]) == len(EVERY)
    assert set(splits["clip-500"]) == {*SHORT, *NEGATIVES} and splits["clip-late"] == LONG
    by = {a.name: a for a in arms}
    assert [by[f"flame-{n}"].store.size for n in s.sizes] == list(s.sizes)
    assert by["facets-raw"].facets == "0" and by["facets-long"].facets == "long"
    assert by["facets-causal"].store.positions == "causal" and by["facets-long"].store.positions == "restart"
    assert by["clip-late"].context == 77 and by["clip-late"].caption == "late.txt"
    assert by["flame-late"].store.prompts == ("long=late.txt",)
    # CLIP arms come after the FLAME arm whose tower they borrow
    for a in arms:
        if a.twin:
            assert names.index(a.twin) < names.index(a.name)


def test_a_part_alone_brings_only_its_arms_and_their_twins():
    arms, splits, members = plan(StudySettings(), ("long",))
    assert [a.name for a in arms] == ["flame-late", "clip-late"] and set(members) == {"long"}
    arms, splits, _ = plan(StudySettings(), ("attention",))
    assert sorted(a.name for a in arms) == ["facets-causal", "facets-long"]


def test_sizes_and_parts_are_checked():
    with pytest.raises(FlameError, match="multiple of 4"):
        StudySettings(sizes=(500, 1002))
    assert Config(only="long,data").parts() == ("data", "long")
    s = Config(quick=True).settings()
    assert s.sizes == (64, 128) and s.base.steps == 20
    assert s.scenes(64).test_combos == s.scenes(128).test_combos == 16
