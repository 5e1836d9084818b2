"""`flame embed`'s settings come from one dataclass: `--help` shows its defaults, and
`--config FILE` values are converted and range-checked into one error line (exit 2)."""

from __future__ import annotations

import dataclasses

import pytest
from support.commands import run_flame
from support.embed_data import make_shards

from flame import config as settings
from flame.cli import main
from flame.embed import Config
from flame.store import EmbeddingStore


def _run(capsys, *args):
    return run_flame(capsys, "embed", *args)


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("max_batch: abc\n", "--max-batch (max_batch): expected a whole number, got 'abc'"),
        ("max_batch: 0\n", "--max-batch must be > 0 (got 0)"),
        ("on_missing: sometimes\n", "--on-missing must be one of skip, error"),
        ("layer: x\n", "--layer: expected an integer"),
    ],
)
def test_bad_config_file_is_one_line_and_exit_2(tmp_path, capsys, yaml_text, expected):
    shards = make_shards(tmp_path / "shards", n_shards=1, per_shard=2)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {tmp_path / 'shards'}\nout: {tmp_path / 'st'}\n" + yaml_text)
    code, out, err = _run(capsys, "--config", bad)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("flame embed: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "st").exists() and shards


def test_config_file_values_are_used_and_flags_override_them(tmp_path, capsys, tiny_llm_dir):
    make_shards(tmp_path / "shards", n_shards=1, per_shard=3)
    cfg = tmp_path / "embed.yaml"
    cfg.write_text(
        f"data: {tmp_path / 'shards'}\nllm: {tiny_llm_dir}\nout: {tmp_path / 'a'}\ndtype: int8\n"
        "max-batch: '2'\nprompts: raw=txt\n"
    )
    code, out, err = _run(capsys, "--config", cfg, "--out", tmp_path / "b")
    assert code == 0, err
    assert not (tmp_path / "a").exists() and EmbeddingStore(tmp_path / "b").dtype == "int8"


def test_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["embed", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(Config):
        shown = settings.shown_default(f)
        if shown and f.metadata.get("cli", True):
            assert f"(default {shown})" in text, (f.name, shown)
    assert "--import-release ROOT" in text and "--release-layout {auto,cc3m,yfcc15m}" in text
    assert "(default 64 on CPU" in text and "(default fp16)" in text and "(default raw=txt)" in text
