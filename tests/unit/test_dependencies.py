"""The declared dependencies: floors the code really needs, and one known-good set of versions.

`constraints.txt` pins the versions `make test` passes with (`make setup` installs with it); each
floor in pyproject.toml must admit its pin, and the floors must cover the newest API the code
calls (checked here against the libraries' own signatures, not against a remembered number)."""

from __future__ import annotations

import importlib.metadata as md
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]


def _pins() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not NAME==VERSION"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_dependency_is_pinned_and_its_floor_admits_the_pin():
    pins = _pins()
    for req in _declared():
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req} does not admit the pinned {pins[name]}"


def _floor(name: str) -> Version:
    req = next(r for r in _declared() if canonicalize_name(r.name) == canonicalize_name(name))
    return min(Version(s.version) for s in req.specifier if s.operator == ">=")


def test_floors_cover_the_api_the_code_calls():
    # llm.py loads with from_pretrained(dtype=...): transformers took `dtype` (for `torch_dtype`) in 4.56.
    assert _floor("transformers") >= Version("4.56")
    # vision.py calls VisionTransformer._embeds, added to open_clip in 2.32.
    assert _floor("open_clip_torch") >= Version("2.32")
    from open_clip.transformer import VisionTransformer

    assert hasattr(VisionTransformer, "_embeds")


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="only the checkout's own .venv is installed from constraints.txt")
def test_the_checkouts_environment_is_the_pinned_one():
    wrong = []
    for name, version in _pins().items():
        try:
            installed = Version(md.version(name))
        except md.PackageNotFoundError:
            continue  # a platform-only package (e.g. CUDA wheels elsewhere)
        if installed != version:
            wrong.append(f"{name} {installed} (pinned {version})")
    assert not wrong, "rerun make setup: " + ", ".join(wrong)
