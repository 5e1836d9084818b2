"""flame.config and the flags flame.cli builds from it: one declaration gives the flag, its
help default, YAML loading with type conversion, range checks and precedence."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from flame import cli
from flame.config import POSITIVE, at_least, build, coerce, setting, validate
from flame.errors import FlameError


@dataclass
class Demo:
    data: list[str] = setting([], help="inputs", required=True, metavar="SHARDS")
    lr: float = setting(5e-4, help="peak rate", check=POSITIVE, group="optim")
    batch_size: int = setting(384, help="per rank", check=at_least(1), group="optim")
    betas: tuple[float, float] = setting((0.9, 0.95), help="AdamW betas")
    hidden: int | None = setting(None, help="projector width", shown="max(D, 4096)")
    pool_first: bool = setting(False, help="pool first", optional_value=True)
    overwrite: bool = setting(False, help="replace")
    progress: bool = setting(True, help="bars", negate="--no-progress")
    resume: str | None = setting(None, help="continue", optional_value="latest")
    positives: int | None = setting(None, help="m", aliases=("-m",))
    precision: str = setting("auto", help="dtype", choices=("auto", "bf16", "fp32"))

    def check(self) -> None:
        if self.hidden is not None and self.hidden < self.batch_size // 1000:
            raise FlameError("--hidden too small for the batch")


def _parse(argv, tmp_path=None):
    parser = cli._Parser(prog="t")
    cli.add_config(parser, Demo)
    return cli.config_from_args(Demo, parser.parse_args(argv)), parser


def test_flags_come_from_the_fields_with_their_meaning():
    cfg, _ = _parse(["--data", "a", "b", "--lr", "1e-3", "--betas", "0.8", "0.9", "--pool-first", "--no-progress",
                     "--resume", "-m", "3", "--batch-size", "12"])
    assert cfg.data == ["a", "b"] and cfg.lr == 1e-3 and cfg.betas == (0.8, 0.9) and cfg.pool_first is True
    assert cfg.progress is False and cfg.resume == "latest" and cfg.positives == 3 and cfg.batch_size == 12
    cfg, _ = _parse(["--data", "a", "--pool-first", "false", "--resume", "run/checkpoint-4", "--overwrite"])
    assert cfg.pool_first is False and cfg.resume == "run/checkpoint-4" and cfg.overwrite is True


def test_help_shows_the_dataclass_defaults():
    _, parser = _parse(["--data", "a"])
    text = " ".join(parser.format_help().split())
    assert "peak rate (default 0.0005)" in text and "per rank (default 384)" in text
    assert "(default 0.9 0.95)" in text and "(default max(D, 4096))" in text
    assert "--no-progress" in text and "bars (default" not in text and "--config FILE" in text


def test_yaml_values_are_converted_and_flags_win(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data: one.tar\nlr: 5e-3\nbatch-size: '64'\npool_first: yes\nbetas: [0.5, 0.6]\n")
    cfg = build(Demo, {"batch_size": "32"}, path)
    assert cfg.data == ["one.tar"] and cfg.lr == 5e-3 and cfg.batch_size == 32 and cfg.pool_first is True
    assert cfg.betas == (0.5, 0.6)


@pytest.mark.parametrize("yaml_text, message", [
    ("data: a\nbatch_size: abc\n", "--batch-size (batch_size): expected a whole number, got 'abc'"),
    ("data: a\nbatch_size: 0\n", "--batch-size must be >= 1 (got 0)"),
    ("data: a\nlr: .inf\n", "--lr (lr): expected a finite number"),
    ("data: a\nbetas: [0.9]\n", "expected 2 values"),
    ("data: a\nprecision: fp8\n", "--precision must be one of auto, bf16, fp32 (got fp8)"),
    ("data: a\nnope: 1\n", "unknown setting 'nope'"),
    ("lr: 1\n", "--data is required"),
    ("data: a\nhidden: 1\nbatch_size: 5000\n", "--hidden too small"),
    ("[1, 2]\n", "must hold a mapping"),
    ("data: [\n", "is not valid YAML"),
])
def test_bad_settings_are_one_flame_error(tmp_path, yaml_text, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(FlameError, match=None) as e:
        build(Demo, {}, path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_coerce_accepts_what_yaml_and_the_api_give():
    assert coerce("5e-4", float, "x") == 5e-4 and coerce(3.0, int, "x") == 3 and coerce("off", bool, "x") is False
    assert coerce(None, int | None, "x") is None and coerce("a", list[str], "x") == ["a"]
    for bad, hint in [(True, int), (2.5, int), ("maybe", bool), (float("nan"), float), ([1], str)]:
        with pytest.raises(FlameError):
            coerce(bad, hint, "x")


def test_validate_checks_values_set_through_the_api():
    cfg = Demo(data=["a"], batch_size=0)
    with pytest.raises(FlameError, match="--batch-size must be >= 1"):
        validate(cfg)


def test_command_line_mistakes_are_one_line(capsys):
    assert cli.main(["convert", "x.pt", "--out", "o", "--bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --bogus" in err[0]
