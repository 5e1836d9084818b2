"""The demo's scene generator: reproducible bytes, split guarantees, caption facets, layouts."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from flame.data import scenes as S

SMALL = S.ScenesConfig(seed=3, train=40, combos=20, eval_size=10, zeroshot=12)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "data"
    assert S.write_dataset(out, SMALL)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = tmp_path / "again"
    S.write_dataset(again, SMALL)
    assert _files(again) == _files(small)
    other = tmp_path / "other"
    S.write_dataset(other, S.scaled(SMALL, seed=4))
    assert (other / "train/scenes-00000.tar").read_bytes() != (small / "train/scenes-00000.tar").read_bytes()


def test_rerun_with_same_settings_is_skipped_and_changed_settings_regenerate(small, tmp_path):
    assert S.write_dataset(small, SMALL) is False  # cached
    out = tmp_path / "d"
    S.write_dataset(out, SMALL)
    (out / "train/scenes-00000.tar").write_bytes(b"junk")  # settings differ -> everything rewritten
    assert S.write_dataset(out, S.scaled(SMALL, zeroshot=10)) is True
    assert tarfile.is_tarfile(out / "train/scenes-00000.tar")


def test_refuses_to_delete_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(S.FlameError, match="not a generated scenes folder"):
        S.write_dataset(tmp_path, SMALL)
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def _training_vocabulary(plan: S.Plan) -> set[str]:
    vocab: set[str] = set()
    for s in plan.combos:
        vocab |= S.words(S.short_caption(s)) | S.words(S.long_caption(s))
    return vocab


def test_paraphrase_words_never_occur_in_training_captions():
    plan = S.plan(S.ScenesConfig())  # the full demo set
    train_vocab = _training_vocabulary(plan)
    para_vocab = set().union(*(S.words(S.paraphrase_caption(s)) for s in plan.test))
    assert para_vocab & train_vocab == S.SHARED_WORDS  # only the articles a/an are shared
    # and for every value of every attribute, not only the ones this seed drew
    every_value = set()
    for table in (S.CATEGORIES, S.COLOURS, S.RELATIONS, S.ATMOSPHERES):
        every_value |= set().union(*(S.words(v["para"]) for v in table.values()))
    assert not (every_value - S.SHARED_WORDS) & train_vocab


def test_paraphrase_split_on_disk_matches_training_shard(small):
    train = _tar_members(small / "train/scenes-00000.tar")
    vocab = set().union(*(S.words(v.decode()) for k, v in train.items() if k.endswith(("txt",))))
    para = _tar_members(small / "eval/paraphrase/test/0.tar")
    for name, text in para.items():
        if name.endswith(".txt"):
            assert S.words(text.decode()) & vocab <= S.SHARED_WORDS, text


def test_every_long_caption_mentions_every_facet_in_40_words_or_more():
    plan = S.plan(S.ScenesConfig())
    for s in plan.combos:
        cap = S.long_caption(s)
        assert len(cap.split()) >= 40, cap
        present = S.words(cap)
        for facet, needed in S.facet_words(s).items():
            assert set(S.words(" ".join(needed))) <= present, (facet, cap)


def test_compositional_pairs_never_occur_in_training():
    plan = S.plan(S.ScenesConfig())
    seen = {(s.main, s.colour) for s in plan.train} | {(s.minor, s.minor_colour) for s in plan.train}
    comp = {(s.main, s.colour) for s in plan.compositional}
    assert comp and not comp & seen
    assert len(comp) == len(S.CATEGORIES)  # one held-out colour per category, all used
    train_text = " ".join(S.short_caption(s) + " " + S.long_caption(s) for s in plan.combos).lower()
    for cat, colour in comp:
        assert f"{colour} {cat}" not in train_text


def test_eval_captions_are_distinct_and_test_combos_are_training_combos():
    plan = S.plan(S.ScenesConfig())
    for split in (plan.test, plan.compositional):
        assert len({S.short_caption(s) for s in split}) == len(split)
    assert set(plan.test) <= set(plan.combos)
    # captions are a function of the combination: the LLM embeds few distinct texts
    assert len({S.long_caption(s) for s in plan.train}) == len(plan.combos)


def test_translations_hand_checked():
    s = S.Scene("heart", "red", "plain", "large", "top", "flower", "orange", "sunset")
    assert S.short_caption(s) == "A red heart above a small orange flower at sunset."
    assert S.french_caption(s) == "Un cœur rouge au-dessus d'une petite fleur orange au coucher du soleil."
    assert S.german_caption(s) == "Ein rotes Herz über einer kleinen orangefarbenen Blume bei Sonnenuntergang."
    assert S.spanish_caption(s) == "Un corazón rojo encima de una pequeña flor naranja al atardecer."
    t = S.Scene("flower", "purple", "dotted", "large", "left", "heart", "blue", "rainy")
    assert S.german_caption(t) == "Eine violette Blume neben einem kleinen blauen Herzen an einem regnerischen Tag."
    assert S.french_caption(t) == "Une fleur violette à côté d'un petit cœur bleu par un jour de pluie."
    assert S.spanish_caption(t) == "Una flor morada al lado de un pequeño corazón azul en un día lluvioso."
    assert S.paraphrase_caption(t) == "A violet blossom beside a little azure valentine during a downpour."
    u = S.Scene("star", "orange", "striped", "medium-sized", "bottom", "car", "green", "night")
    assert S.short_caption(u) == "An orange star below a small green car at night."
    assert S.german_caption(u) == "Ein orangefarbener Stern unter einem kleinen grünen Auto in der Nacht."


def test_train_shard_is_read_by_flame_embed_and_eval_splits_by_clip_benchmark(small):
    from clip_benchmark.datasets.builder import build_wds_dataset

    from flame.data.captions import read_shard_captions

    caps = read_shard_captions(small / "train/scenes-00000.tar", ["txt", "long.txt"])
    assert len(caps.keys) == SMALL.train
    k = caps.keys[0]
    meta = json.loads(_tar_members(small / "train/scenes-00000.tar")[f"{k}.json"])
    scene = S.Scene(**{f: meta[f] for f in S.Scene.__dataclass_fields__})
    assert caps.text["txt"][k] == S.short_caption(scene) and caps.text["long.txt"][k] == S.long_caption(scene)

    ret = build_wds_dataset("wds/test", transform=lambda im: im.size, data_dir=str(small / "eval/multilingual-de"))
    rows = list(ret)
    assert len(rows) == SMALL.eval_size and rows[0][0] == (SMALL.image_size, SMALL.image_size)
    assert len(rows[0][1]) == 1 and rows[0][1][0].startswith(("Ein ", "Eine "))

    zs = build_wds_dataset("wds/zeroshot", transform=lambda im: im.size, data_dir=str(small / "eval/zeroshot"))
    assert zs.classes == list(S.CATEGORIES) and len(zs.templates) == len(S.ZEROSHOT_TEMPLATES)
    labels = [int(label) for _, label in zs]
    assert len(labels) == SMALL.zeroshot and set(labels) <= set(range(len(S.CATEGORIES)))


def test_training_pairs_differ_only_in_the_main_category_and_sit_side_by_side():
    from dataclasses import replace

    plan = S.plan(S.ScenesConfig())
    for k in range(0, len(plan.train) - 1, 2):
        a, b = plan.train[k], plan.train[k + 1]
        assert a.main != b.main and replace(a, main=b.main) == b, (a, b)
