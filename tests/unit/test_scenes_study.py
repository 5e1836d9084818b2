"""`flame study`'s generator splits: long captions whose details CLIP's 77-token context cuts off
(checked with open_clip's own tokenizer), the same details in front, and hard negatives that differ
from the true caption only in the two swapped attributes."""

from __future__ import annotations

import difflib
import json
import re
import tarfile

import pytest
from open_clip import get_tokenizer
from open_clip.tokenizer import SimpleTokenizer

from flame.data import scenes
from flame.data.scenes import ScenesConfig, longcaps, plan

CONFIG = ScenesConfig(train=40, combos=40, eval_size=24, zeroshot=10, study=True)
BPE = SimpleTokenizer()
CLIP77 = get_tokenizer("ViT-B-32")  # context 77, what every CLIP reads


def _start(caption: str, phrase: str) -> int:
    """Index in CLIP's token sequence ([SOT] counted) of the first token of the phrase's first use."""
    m = re.search(rf"\b{re.escape(phrase)}\b", caption)
    assert m, (phrase, caption)
    return 1 + len(BPE.encode(caption[: m.start()]))


def _scenes():
    p = plan(CONFIG)
    return p.combos + p.long


def test_long_captions_exceed_100_clip_tokens_and_every_detail_is_after_token_77():
    tok = CLIP77
    for s in _scenes():
        cap = scenes.late_caption(s)
        assert len(BPE.encode(cap)) + 2 >= 100, cap
        for phrase in scenes.detail_phrases(s):
            assert _start(cap, phrase) >= 77, (phrase, cap)
        # what CLIP keeps holds none of the details: truncation leaves the opening alone
        kept = tok([cap])[0].tolist()
        assert kept[76] == BPE.encoder["<end_of_text>"]
        assert tok([scenes.opening(s) + " " + longcaps.details(replace_details(s))])[0].tolist() == kept


def replace_details(s):
    """Another scene with the same opening and other details."""
    from dataclasses import replace

    other = next(c for c in scenes.CATEGORIES if c not in (s.main, s.minor))
    return replace(s, minor=other, position="top" if s.position != "top" else "bottom")


def test_front_variant_has_every_detail_before_token_77_and_the_same_sentences():
    for s in _scenes():
        late, front = scenes.late_caption(s), scenes.front_caption(s)
        assert sorted(late.split()) == sorted(front.split())
        for phrase in scenes.detail_phrases(s):
            assert _start(front, phrase) < 77, (phrase, front)


def test_long_split_groups_share_the_opening_and_differ_in_the_details():
    p = plan(CONFIG)
    assert len(p.long) == CONFIG.eval_size and len({scenes.late_caption(s) for s in p.long}) == len(p.long)
    for i in range(0, len(p.long), 4):
        group = p.long[i : i + 4]
        assert len({scenes.opening(s) for s in group}) == 1
        cut = {tuple(CLIP77([scenes.late_caption(s)])[0].tolist()) for s in group}
        assert len(cut) == 1  # CLIP sees the same 77 tokens for every image of a group


ARTICLES = {"a", "an", "A", "An"}


@pytest.mark.parametrize("swap", scenes.SWAPS)
def test_hard_negatives_differ_only_in_the_swapped_attributes(swap):
    for s in plan(CONFIG).test:
        true, neg = scenes.short_caption(s), scenes.short_caption(scenes.hard_negative(s, swap))
        a, b = true.rstrip(".").split(), neg.rstrip(".").split()
        assert len(a) == len(b) and true != neg
        changed = [(x, y) for x, y in zip(a, b) if x != y and not {x, y} <= ARTICLES]
        pair = (s.colour, s.minor_colour) if swap == "colours" else (s.main, s.minor)
        assert changed == [pair, pair[::-1]], (true, neg)
        ops = difflib.SequenceMatcher(a=a, b=b).get_opcodes()
        assert all(op in ("equal", "replace") for op, *_ in ops)


def test_written_splits_are_deterministic_and_the_negatives_point_at_test_images(tmp_path):
    scenes.write_dataset(tmp_path / "a", CONFIG)
    scenes.write_dataset(tmp_path / "b", CONFIG)
    for rel in ("train/scenes-00000.tar", "eval/long-late/test/0.tar", "eval/long-front/test/0.tar",
                f"eval/{scenes.NEGATIVES}"):
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    rows = [json.loads(line) for line in (tmp_path / "a" / "eval" / scenes.NEGATIVES).read_text().splitlines()]
    with tarfile.open(tmp_path / "a" / "eval" / "test" / "test" / "0.tar") as tar:
        test = {m.name.rsplit(".", 1)[0]: tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")}
    assert len(rows) == CONFIG.eval_size and {r["swap"] for r in rows} == set(scenes.SWAPS)
    assert all(test[r["key"]] == r["caption"] != r["negative"] for r in rows)
    with tarfile.open(tmp_path / "a" / "train" / "scenes-00000.tar") as tar:
        late = [m for m in tar if m.name.endswith(".late.txt")]
    assert len(late) == CONFIG.train
    other = ScenesConfig(**{**CONFIG.__dict__, "seed": 1})
    assert [scenes.late_caption(s) for s in plan(other).long] != [scenes.late_caption(s) for s in plan(CONFIG).long]


def test_a_demo_set_keeps_its_settings_without_the_study_flag():
    assert "study" not in ScenesConfig().to_dict() and ScenesConfig(study=True).to_dict()["study"] is True
    assert plan(ScenesConfig(train=20, combos=20, eval_size=8, zeroshot=4)).long == []


def test_nested_sets_share_every_evaluation_split_and_a_prefix_of_combinations(tmp_path):
    """`flame study`'s data-efficiency sets: a smaller set's combinations are the larger one's first
    ones, and with the same `test_combos` every evaluation split is byte-for-byte the same."""
    small = ScenesConfig(train=64, combos=16, eval_size=8, zeroshot=10, study=True, test_combos=16)
    large = ScenesConfig(train=128, combos=32, eval_size=8, zeroshot=10, study=True, test_combos=16)
    ps, pl = plan(small), plan(large)
    assert pl.combos[:16] == ps.combos and len(set(pl.combos)) == 32
    assert ps.test == pl.test and set(ps.test) <= set(ps.combos)
    assert {s for s in ps.train} == set(ps.combos) and {s for s in pl.train} == set(pl.combos)
    for config, out in ((small, tmp_path / "s"), (large, tmp_path / "l")):
        scenes.write_dataset(out, config)
    eval_files = sorted(p.relative_to(tmp_path / "s") for p in (tmp_path / "s" / "eval").rglob("*") if p.is_file())
    assert len(eval_files) > 20
    for rel in eval_files:
        assert (tmp_path / "s" / rel).read_bytes() == (tmp_path / "l" / rel).read_bytes(), rel
    # without test_combos the larger set's test comes from all of its combinations (the demo's split)
    assert plan(ScenesConfig(train=128, combos=32, eval_size=8, zeroshot=10)).test != pl.test
    with pytest.raises(scenes.FlameError, match="test combinations"):
        plan(ScenesConfig(train=64, combos=16, eval_size=8, test_combos=4))
