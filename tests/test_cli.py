"""The `flame` command: help, one-line errors, and `flame bench facets` figures."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from flame.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


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
