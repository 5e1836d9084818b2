"""`flame study --quick` end to end: nested generated sets -> six stores (built-in SmolLM2) -> 14 trained
arms -> scores -> study.json / study.md / plot; a rerun is cached, and a removed score is redone alone."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from flame.cli import main as flame_main
from flame.study.arms import plan
from flame.study.settings import PARTS, Config


def test_bad_part_is_one_line_and_exit_2_before_any_work(tmp_path, capsys):
    assert flame_main(["study", "--only", "data,colour", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--only must be a comma list of data, long, facets, attention, negatives" in err
    assert not (tmp_path / "s").exists()


def test_a_folder_the_study_did_not_make_is_refused(tmp_path, capsys):
    (tmp_path / "mine.txt").write_text("keep me")
    assert flame_main(["study", "--quick", "--out", str(tmp_path)]) == 2
    assert "is not a flame study folder" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        flame_main(["study", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default runs/study)" in text and "(default 1000; --quick 20)" in text
    assert "(default data,long,facets,attention,negatives)" in text


def _test_images(tar_path) -> dict:
    with tarfile.open(tar_path) as tar:
        return {m.name[:-4]: Image.open(io.BytesIO(tar.extractfile(m).read())).convert("RGB")
                for m in tar.getmembers() if m.name.endswith(".png")}


def _brute_force_negatives(out, arm: str) -> float:
    """The hard-negative accuracy recomputed from the checkpoint: PIL images straight from the tar,
    text vectors from the model, one dot product per pair."""
    from flame.model import FlameModel

    model = FlameModel.from_pretrained(out / "runs" / arm / "checkpoint-20", cache_dir=out / "cache" / "text")
    images = _test_images(out / "data" / "size-128" / "eval" / "test" / "test" / "0.tar")
    rows = [json.loads(x) for x in (out / "data" / "size-128" / "eval" / "hard-negatives" / "pairs.jsonl").open()]
    img = model.encode_image([images[r["key"]] for r in rows])
    cap = model.encode_text([r["caption"] for r in rows], prompts="raw")
    neg = model.encode_text([r["negative"] for r in rows], prompts="raw")
    return float(((img * cap).sum(-1) > (img * neg).sum(-1)).float().mean())


@pytest.mark.slow
def test_study_quick_end_to_end_cached_and_redone_per_stage(tmp_path, flame_cache, capsys):
    out = tmp_path / "study"
    assert flame_main(["study", "--quick", "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "study.json").read_text())
    arms, splits, members = plan(Config(quick=True).settings(), PARTS)
    assert set(summary["results"]) == {a.name for a in arms} and summary["members"] == members
    for name, metrics in summary["results"].items():
        assert set(metrics) == set(splits[name]), name
        for split, m in metrics.items():
            values = [v for k, v in m.items() if k not in ("pairs", "chance_r1", "chance_r5", "chance")]
            assert values and all(v is None or 0.0 <= v <= 1.0 for v in values), (name, split, m)

    # what each arm trained on is what the study says
    clip_late = json.loads((out / "runs" / "clip-late" / "done.json").read_text())["config"]
    assert clip_late["text"]["context_length"] == 77 and clip_late["caption_ext"] == "late.txt"
    assert json.loads((out / "store" / "causal" / "manifest.json").read_text())["positions"] == "causal"
    assert json.loads((out / "store" / "late" / "manifest.json").read_text())["facets"] == [f"long/{i}" for i in
                                                                                          range(7)]
    # every size's evaluation splits are the same files (one test split for every curve point)
    assert (out / "data" / "size-64" / "eval" / "test" / "test" / "0.tar").read_bytes() == \
        (out / "data" / "size-128" / "eval" / "test" / "test" / "0.tar").read_bytes()
    # the hard negatives' accuracy agrees with a brute force from the checkpoint
    got = summary["results"]["flame-128"]["hard-negatives"]["accuracy"]
    assert got == pytest.approx(_brute_force_negatives(out, "flame-128"), abs=1e-9)

    report = (out / "study.md").read_text()
    for title in ("## Data efficiency", "## Hard negatives", "## Long captions", "## What the facets buy",
                  "## Facet-decoupled attention against causal"):
        assert title in report
    late = summary["results"]["clip-late"]["long-late"]
    assert f"{late['i2t_r1']:.3f} / {late['t2i_r1']:.3f}" in report
    assert (out / "plots" / "data_efficiency.png").read_bytes()[:4] == b"\x89PNG"

    # a rerun reuses every stage and gives the same numbers
    assert flame_main(["study", "--quick", "--out", str(out), "--no-progress"]) == 0
    second = capsys.readouterr().out
    assert "done in" not in second.split("[", 1)[1].split("report:")[0]  # nothing before the report ran again
    assert json.loads((out / "study.json").read_text())["results"] == summary["results"]
    # a removed score is redone, and nothing else
    (out / "results" / "clip-late.json").unlink()
    assert flame_main(["study", "--quick", "--out", str(out), "--no-progress", "--only", "long"]) == 0
    third = capsys.readouterr().out
    assert "score-clip-late: done in" in third and "train-clip-late: cached, skipped" in third
    assert json.loads((out / "results" / "clip-late.json").read_text())["metrics"] == summary["results"]["clip-late"]
