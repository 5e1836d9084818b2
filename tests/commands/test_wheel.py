"""A real wheel: built from the project's files, installed (without dependencies) into a fresh
virtual environment that reuses the installed dependencies through a .pth file, and run from a
folder outside the source tree: `flame --version`, `flame demo --quick --help`, and
encode_image/encode_text through the installed package, which reads no file of the source tree."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from PIL import Image
from support.evalsets import tiny_model_folder

import flame

REPO = Path(__file__).resolve().parents[2]

SNIPPET = """
import json, os, sys
opened = []
def hook(event, args):
    if event == "open" and isinstance(args[0], (str, bytes)):
        opened.append(os.path.realpath(os.fsdecode(args[0])))
sys.addaudithook(hook)
import flame
from PIL import Image
model, _, preprocess = flame.create_model_and_transforms(sys.argv[1])
image = preprocess(Image.new("RGB", (40, 30), (200, 30, 30))).unsqueeze(0)
v = model.encode_image(image)
t = model.encode_text(flame.get_tokenizer(model)(["a red square", "a blue circle"]))
print(json.dumps({"file": flame.__file__, "image": v.tolist(), "text": t.tolist(), "opened": opened}))
"""


def _run(cmd, cwd, env) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.slow
def test_wheel_installs_and_runs_outside_the_source_tree(tmp_path, tiny_llm_dir):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", FLAME_CACHE=str(tmp_path / "cache"))
    # the project's files only (no caches, no build outputs), so the build never writes into the tree
    src = tmp_path / "project"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", src, "-w",
          tmp_path / "dist"], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("flame_clip-*.whl")

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([python, "-c", purelib], tmp_path, env).strip())
    # the dependencies already installed here, after the fresh environment's own site-packages
    (site / "_reused_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], tmp_path, env)

    work = tmp_path / "elsewhere"
    work.mkdir()
    assert _run([venv / "bin" / "flame", "--version"], work, env).strip() == f"flame {flame.__version__}"
    assert "--quick" in _run([venv / "bin" / "flame", "demo", "--quick", "--help"], work, env)

    model_dir = tiny_model_folder(tmp_path / "model", tiny_llm_dir)
    got = json.loads(_run([python, "-c", SNIPPET, model_dir], work, env).splitlines()[-1])
    assert Path(got["file"]).resolve().is_relative_to(site.resolve())  # flame came from the wheel
    prefix = Path(sys.prefix).resolve()
    from_tree = [p for p in got["opened"] if Path(p).is_relative_to(REPO) and not Path(p).is_relative_to(prefix)]
    assert not from_tree, from_tree[:5]
    assert not [p for p in got["opened"] if "/src/flame/" in p]

    # the same vectors as this source tree's flame gives
    from flame.factory import create_model_and_transforms

    model, _, preprocess = create_model_and_transforms(str(model_dir), cache_dir=tmp_path / "cache2")
    image = preprocess(Image.new("RGB", (40, 30), (200, 30, 30))).unsqueeze(0)
    assert torch.allclose(torch.tensor(got["image"]), model.encode_image(image), atol=1e-6)
    text = model.encode_text(["a red square", "a blue circle"])
    assert torch.allclose(torch.tensor(got["text"]), text, atol=1e-6)


def test_version_flag(capsys):
    from flame.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"flame {flame.__version__}"
