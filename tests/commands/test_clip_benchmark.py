"""CLIP_benchmark's own `eval` command on a FLAME model (`python -m flame.integrations.clip_benchmark`):
its command line, webdataset builder and metrics, on sets in its webdataset layout, give the metrics
`flame eval` gives on the same model and images."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.commands import one_line, run_flame
from support.evalsets import colour_word_llm, palette_wds, tiny_model_folder

from flame.integrations.clip_benchmark import main as cb_main

TOL = 1e-6


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_llm_dir):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("clip-benchmark")
    mp.setenv("FLAME_CACHE", str(root / "cache"))
    tiny_model_folder(root / "model", tiny_llm_dir)
    # class names need text vectors that differ (the random tiny LLM's are 0.99 alike, and every
    # image then picks one class): the LLM whose colour words embed orthogonally
    tiny_model_folder(root / "colour-model", colour_word_llm(tiny_llm_dir, root / "colour-llm"))
    palette_wds(root / "colours", "classification")
    palette_wds(root / "captions", "retrieval")
    yield root
    mp.undo()


def _model(dataset: str) -> str:
    return "colour-model" if dataset == "colours" else "model"


def _flame_eval(capsys, bench, dataset: str, *extra) -> dict:
    out = bench / f"flame-{dataset}{''.join(extra)}.json"
    code, _, err = run_flame(capsys, "eval", "--model", bench / _model(dataset), "--dataset", bench / dataset,
                             "--output", out, "--workers", "0", "--no-progress", *extra)
    assert code == 0, err
    return json.loads(out.read_text())


def _cb_args(bench, dataset: str, task: str, out) -> list[str]:
    return ["eval", "--model_type", "flame", "--model", "flame", "--pretrained", str(bench / _model(dataset)),
            "--dataset", f"wds/{dataset}", "--dataset_root", str(bench / dataset), "--task", task,
            "--num_workers", "0", "--batch_size", "8", "--output", str(out), "--quiet"]


def _same(cb: dict, ours: dict) -> None:
    print("CLIP_benchmark:", cb, "\nflame eval:", ours)
    assert set(cb) == set(ours), (cb, ours)
    for k, v in cb.items():
        assert abs(v - ours[k]) <= TOL, (k, v, ours[k])


@pytest.mark.slow
def test_zero_shot_through_clip_benchmarks_command_line_is_flame_eval(bench, capsys):
    out = bench / "cb-colours.json"
    # its command line in a process of its own, as a user runs it; --no_amp: its logits in float32
    done = subprocess.run([sys.executable, "-m", "flame.integrations.clip_benchmark",
                           *_cb_args(bench, "colours", "zeroshot_classification", out), "--no_amp"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    cb = json.loads(out.read_text())
    assert cb["task"] == "zeroshot_classification" and cb["model"] == "flame"
    ours = _flame_eval(capsys, bench, "colours")
    assert ours["prompts"] == "raw" and ours["images"] == 24
    assert set(cb["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    _same(cb["metrics"], ours["metrics"])


@pytest.mark.slow
@pytest.mark.parametrize("prompts", [None, "long"])
def test_retrieval_through_clip_benchmarks_command_line_is_flame_eval(bench, capsys, prompts):
    out = bench / f"cb-captions-{prompts}.json"
    own = ["--flame_prompts", prompts] if prompts else []
    # amp left on (CLIP_benchmark's default): its retrieval scores are computed outside autocast
    # and FLAME's vectors are float32 under it
    assert cb_main([*_cb_args(bench, "captions", "zeroshot_retrieval", out), "--recall_k", "1", "5", "10",
                    *own]) == 0
    cb = json.loads(out.read_text())
    assert cb["task"] == "zeroshot_retrieval"
    ours = _flame_eval(capsys, bench, "captions", *(["--prompts", prompts] if prompts else []))
    assert ours["prompts"] == (prompts or "raw") and ours["captions"] == 48
    assert len(cb["metrics"]) == 6
    _same(cb["metrics"], ours["metrics"])


def test_a_folder_that_is_no_model_is_one_line_exit_2(capsys, tmp_path):
    capsys.readouterr()
    args = _cb_args(tmp_path, "colours", "zeroshot_classification", tmp_path / "x.json")
    args[args.index("--pretrained") + 1] = str(tmp_path)
    assert cb_main(args) == 2
    assert "is not a FLAME model" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "x.json").exists()
