"""`flame eval`'s settings: one dataclass, its rules checked before any work, `--config FILE`."""

from __future__ import annotations

import pytest
from support.commands import one_line, run_flame

from flame.cli import main


def _run(capsys, *argv):
    return run_flame(capsys, *argv)


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ("batch_size: abc\n", "--batch-size (batch_size): expected a whole number, got 'abc'"),
        ("workers: -1\n", "--workers must be >= 0 (got -1)"),
        ("batch-size: 0\n", "--batch-size must be >= 1 (got 0)"),
        ("force_llm: maybe\n", "--force-llm (force_llm): expected true or false, got 'maybe'"),
    ],
)
def test_config_file_bad_value_is_one_line_exit_2(capsys, tmp_path, yaml_text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tmp_path}\ndataset: {tmp_path}\n" + yaml_text)
    code, _, err = _run(capsys, "eval", "--config", bad)
    assert code == 2 and message in one_line(err)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "m", "--dataset", "d", "--suite", "s.yaml"], "give --dataset or --suite, not both"),
        (["--model", "m"], "--dataset PATH (or --suite FILE) is required"),
        (["--dataset", "d"], "--model is required"),
        (["--prepare", "--suite", "s.yaml"], "--prepare needs --model M or --embeddings STORE"),
        (["--prepare", "--suite", "s.yaml", "--model", "m", "--embeddings", "e"], "not both"),
        (["--model", "m", "--dataset", "d", "--task", "ranking"], "unknown task 'ranking'"),
    ],
)
def test_rules_between_settings_come_before_any_file_is_read(capsys, argv, message):
    code, _, err = _run(capsys, "eval", *argv)  # none of these paths exists: the rule is the first error
    assert code == 2 and message in one_line(err)


def test_flags_override_the_config_file(tmp_path):
    from flame import config
    from flame.evaluate.cli import Config

    f = tmp_path / "eval.yaml"
    f.write_text("batch_size: 8\nworkers: 0\nprogress: false\nmodel: run\ndataset: d\n")
    cfg = config.build(Config, {"batch_size": "16"}, f)
    assert (cfg.batch_size, cfg.workers, cfg.progress, cfg.model) == (16, 0, False, "run")


def test_help_shows_the_dataclass_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for text in ("images per batch (default 64)", "DataLoader workers (default 2)", "(default auto)",
                 "(default by the dataset)", "--no-progress", "--config FILE", "--prepare", "--force-llm"):
        assert text in out, text
