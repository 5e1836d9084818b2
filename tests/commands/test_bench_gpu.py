"""`flame bench gpu --quick` on the CPU: every part runs and its figures show it ran (packed equals
separate passes, the resumed run equals the whole one, the CPU-bf16 store is close to the fp32 one,
throughputs are positive); the CUDA-only parts say why they were skipped; a failing part keeps the
figures of the others; bad settings are one line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from support.commands import run_flame

from flame.benchmarks import gpu


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench-gpu") / "gpu.json"
    proc = subprocess.run([sys.executable, "-m", "flame", "bench", "gpu", "--quick", "--device", "cpu", "--json",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "flame bench gpu" in proc.stdout and "resume max abs diff" in proc.stdout
    return json.loads(out.read_text())


@pytest.mark.slow
def test_quick_run_measures_every_part(quick_report):
    r = quick_report
    assert r["mode"] == "quick" and r["device"] == "cpu"
    assert list(r["parts"]) == list(gpu.PARTS)
    assert not [name for name, part in r["parts"].items() if "error" in part]

    env = r["parts"]["environment"]
    assert env["matmul_ceiling"]["tflops"] > 0 and env["matmul_ceiling"]["dtype"] == "float32"
    assert env["versions"]["torch"] == torch.__version__ and env["versions"]["transformers"]
    assert env["sdpa"]["math"]["no_mask"] is True and env["sdpa"]["math"]["bool_mask"] is True
    assert env["gpu"] == {"skipped": "no CUDA"}

    pg = r["parts"]["process_group"]
    assert pg["ok"] and pg["backend"] == "gloo" and pg["gloo_all_reduce_us"] > 0
    assert pg["nccl"] == {"skipped": "no CUDA"}

    resume = r["parts"]["train_resume"]
    assert resume["first_logged_step_after_resume"] == resume["resumed_at"] + 1  # it really resumed
    assert resume["bit_exact"] and resume["match"] and resume["max_abs_diff"] == 0.0
    assert resume["trained_change"] > 1e-5  # the weights moved between the checkpoints compared

    embed = r["parts"]["embed"]
    assert embed["device"]["llm_dtype"] == "bfloat16" and embed["cpu_fp32"]["llm_dtype"] == "float32"
    assert embed["vectors"] == 16 * 11 and embed["k"] == 11  # 2 shards x 8 captions, raw + short + long
    assert embed["min_cosine"] > 0.99
    assert embed["max_abs"] > 0  # two different computations, not one store read twice


@pytest.mark.slow
def test_quick_facet_pass_equals_separate_passes(quick_report):
    fp = quick_report["parts"]["facet_pass"]
    assert fp["attention"]["attn_implementation"] == "sdpa" and fp["attention"]["sdpa_kernel"]
    for name, k in (("raw", 1), ("short", 3), ("long", 7)):
        s = fp[name]
        assert s["k"] == k
        assert s["packed_vs_separate"]["max_rel"] < 1e-4 and s["packed_vs_separate"]["min_cosine"] > 0.9999
        for batching in ("default", "token_budget_only"):
            t = s[batching]
            assert t["tokens"] > t["captions"] * 20  # 20-40 token captions, each with its prompt
            assert t["forward_tokens_per_s"] >= t["end_to_end_tokens_per_s"] > 0
            assert t["forward_mfu"] > 0 and 0 <= t["padding_share"] < 1


@pytest.mark.slow
def test_quick_step_and_loader(quick_report):
    step, loader = quick_report["parts"]["training_step"], quick_report["parts"]["loader"]
    assert step["flops_per_step"] > 0
    for name in ("eager", "eager_checkpointing"):
        assert step[name]["images_per_s"] > 0 and step[name]["mfu"] > 0
    for name in ("compiled", "compiled_checkpointing"):
        assert "no CUDA" in step[name]["skipped"]
    assert step["fastest"]["variant"] in ("eager", "eager_checkpointing")
    assert loader["images_per_s"] > 0 and loader["workers"] >= 1 and loader["batch_shape"] == [8, 3, 32, 32]
    goals = quick_report["goals"]
    assert set(goals) == set(gpu.GOALS)
    assert all(g["met"] == "not measured" for g in goals.values())
    assert goals["loader_over_step"]["value"] == pytest.approx(loader["images_per_s"] / step["fastest"]["images_per_s"])


def test_a_failing_part_keeps_the_others(capsys, tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("the loader broke")

    monkeypatch.setitem(gpu.PARTS, "loader", broken)
    out = tmp_path / "gpu.json"
    result = run_flame(capsys, "bench", "gpu", "--quick", "--device", "cpu", "--parts", "environment,loader",
                       "--json", out)
    assert result.code == 2
    assert result.error == "flame bench: error: flame bench gpu: 1 part(s) failed: loader (errors in the report)"
    report = json.loads(out.read_text())
    assert report["parts"]["environment"]["matmul_ceiling"]["tflops"] > 0
    assert report["parts"]["loader"]["error"] == "RuntimeError: the loader broke"


@pytest.mark.parametrize("argv, message", [
    (["--quick", "--parts", "environment,nope"], "--parts: unknown part 'nope'"),
    (["--quick", "--budget", "0"], "--budget must be"),
])
def test_bad_settings_are_one_line(capsys, argv, message):
    result = run_flame(capsys, "bench", "gpu", *argv)
    assert result.code == 2 and message in result.error


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_full_mode_needs_cuda(capsys, tmp_path):
    result = run_flame(capsys, "bench", "gpu", "--json", tmp_path / "gpu.json")
    assert result.code == 2 and "needs a CUDA device" in result.error and "--quick" in result.error
    assert not (tmp_path / "gpu.json").exists()
