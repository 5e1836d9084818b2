"""The `flame` command: help, one-line errors, and `flame bench facets` figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from support.commands import run_flame

from flame.cli import main


def run_cli(capsys, *argv):
    return run_flame(capsys, *argv)


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for command in ("embed", "train", "bench"):
        assert command in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--llm", "nowhere/at/all/"], "unknown LLM"),
        (["--layer", "99"], "layer 99 is out of range"),
        (["--prompts", "{bad}"], "prompt-set file"),
        (["--prompts", "no-such-set"], "unknown prompt set"),
        (["--llm", "{bert}"], "not a decoder-only causal language model"),
    ],
)
def test_bench_facets_bad_input_is_one_line(capsys, tiny_llm_dir, tmp_path, argv, message):
    from transformers import BertConfig, BertModel

    bad = tmp_path / "bad.yaml"
    bad.write_text("prefix: [unclosed\n")
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(tmp_path / "bert")
    argv = [a.replace("{bad}", str(bad)).replace("{bert}", str(tmp_path / "bert")) for a in argv]
    if "--llm" not in argv:
        argv += ["--llm", str(tiny_llm_dir)]
    code, out, err = run_cli(capsys, "bench", "facets", "--captions", "2", *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_bad_input_through_the_console_script_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "flame", "bench", "facets", "--llm", str(tmp_path / "nothing.gguf")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"flame bench: error: GGUF file not found: {tmp_path / 'nothing.gguf'}"]


def test_bench_facets_reports_the_figures(tiny_llm_dir, tmp_path, capsys):
    out_json = tmp_path / "facets.json"
    code, out, _ = run_cli(
        capsys, "bench", "facets", "--llm", str(tiny_llm_dir), "--captions", "6", "--repeats", "1",
        "--json", str(out_json),
    )  # fmt: skip
    assert code == 0
    figures = json.loads(out_json.read_text())
    for key in ("naive_captions_per_s", "packed_captions_per_s", "speedup", "token_bound", "max_rel_diff"):
        assert key in figures and key in out
    assert figures["max_rel_diff"] <= 1e-4
    assert 3.0 < figures["token_bound"] < 7.0  # ~150-token captions, 7 facets
    assert 100 <= figures["caption_tokens_mean"] <= 200


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("samples: lots\n", "--samples (samples): expected a whole number, got 'lots'"),
        ("dim: 0\n", "--dim must be >= 1 (got 0)"),
        ("m: 12\n", "--m 12 is more than the --k 11 embeddings per sample"),
        ("json: [a, b]\n", "--json (json): expected a path"),
    ],
)
def test_bench_store_config_file_bad_value_is_one_line(capsys, tmp_path, yaml_text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    code, _, err = run_cli(capsys, "bench", "store", "--config", str(bad))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0] and "Traceback" not in err, err


def test_bench_store_figures_from_a_config_file(capsys, tmp_path):
    settings = tmp_path / "store.yaml"
    settings.write_text(f"samples: 24\ndim: 8\nshard-size: 10\nbatch: 6\nbatches: 2\njson: {tmp_path / 'a.json'}\n")
    code, out, err = run_cli(capsys, "bench", "store", "--config", str(settings), "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    assert not (tmp_path / "a.json").exists()  # the flag overrides the file
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["samples"] == 24 and figures["dim"] == 8 and figures["read_facets_per_sample"] == 6
    assert figures["files_per_sample_fp16"] == 2 * 3 / 24 and figures["int8_cosine_min"] > 0.9
    assert "read_speedup" in out and "flame bench store" in out


@pytest.mark.parametrize(
    "action, texts",
    [
        ("facets", ["(default smollm2-135m)", "(default long)", "(default 64)", "{sdpa,eager}"]),
        ("store", ["(default 1000)", "(default 5120)", "(default a temp dir)", "--json FILE"]),
        ("train", ["-m POSITIVES", "(default 6)", "(default 768)", "--json FILE"]),
    ],
)
def test_bench_help_shows_the_dataclass_defaults(capsys, action, texts):
    with pytest.raises(SystemExit) as e:
        main(["bench", action, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "--config FILE" in out
    assert all(t in out for t in texts), out


def test_benchmark_scripts_import_nothing_from_tests_and_their_helpers_run(tmp_path):
    import ast
    from pathlib import Path

    from flame.benchmarks.learning import bag_of_words_store, heldout_r1
    from flame.data.synthetic import write_shards
    from flame.model import FlameModel
    from flame.vision import TowerConfig

    for script in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py"):
        tree = ast.parse(script.read_text())
        names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] in ("tests", "conftest") or n.startswith("test_")], script
        assert "sys.path" not in script.read_text(), script

    shards = write_shards(tmp_path / "held", 16, shard_size=16, size=32, seed=2)
    store = bag_of_words_store(shards, tmp_path / "store", dim=16, k=2)
    assert store.k == 2 and store.dim == 16
    FlameModel(TowerConfig("vit-tiny", embed_dim=16, proj_hidden=16, image_size=32)).save(tmp_path / "model")
    r1, n = heldout_r1(tmp_path / "model", tmp_path / "store", shards[0])
    assert 0.0 <= r1 <= 1.0 and 1 <= n <= 16


@pytest.mark.parametrize("action, yaml_text, message", [
    ("facets", "captions: many\n", "--captions (captions): expected a whole number, got 'many'"),
    ("facets", "repeats: 0\n", "--repeats must be >= 1 (got 0)"),
    ("facets", "attn: flash\n", "--attn must be one of sdpa, eager (got flash)"),
    ("train", "batch_size: big\n", "--batch-size (batch_size): expected a whole number, got 'big'"),
    ("train", "rounds: 0\n", "--rounds must be >= 1 (got 0)"),
])
def test_bench_facets_and_train_settings_files_are_checked(capsys, tmp_path, action, yaml_text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    code, _, err = run_cli(capsys, "bench", action, "--config", str(bad))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
