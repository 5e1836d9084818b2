"""Issue 18 item 1: a model folder from a stranger. config.json is checked in full before anything
is built (types, tower options, the tower's cost), `latest` names a checkpoint inside the run folder,
and an LLM the folder names on the hub is never downloaded without the user asking."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support.commands import run_flame
from support.untrusted import caption_table, edit_config, model_folder, text_side

from flame.errors import FlameError
from flame.model import FlameModel

SPEC = "tiny-org/tiny-llm"  # a hub id no cache on this machine holds


@pytest.fixture()
def folder(tmp_path) -> Path:
    return model_folder(tmp_path / "m", text_side(SPEC, None))


def _set(path: str, value):
    def edit(cfg):
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
    return edit


def test_tower_kwargs_never_reach_timm_with_a_file_to_read(tmp_path, monkeypatch):
    """timm.create_model(checkpoint_path=...) reads (and, in older timm, unpickles) any file."""
    import timm

    secret = tmp_path / "secret.pth"
    torch.save({"pos_embed": torch.zeros(1)}, secret)
    calls = []
    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k) or real(*a, **k))
    folder = model_folder(tmp_path / "m", text_side(SPEC, None), tower="timm:vit_tiny_patch16_224")
    for key, value in (("checkpoint_path", str(secret)), ("pretrained", True), ("pretrained_cfg_overlay",
                       {"file": str(secret)}), ("act_layer", "os.system")):
        calls.clear()
        edit_config(folder, _set("tower.tower_kwargs", {key: value}))
        with pytest.raises(FlameError, match=f"option '{key}' is refused"):
            FlameModel.load(folder)
        assert calls == []  # refused before timm saw it
    # an architecture option is passed on
    two = model_folder(tmp_path / "two", text_side(SPEC, None), tower="timm:vit_tiny_patch16_224",
                       tower_kwargs={"depth": 2})
    assert len(FlameModel.load(two).visual.trunk.model.blocks) == 2


@pytest.mark.parametrize("path,value,message", [
    ("tower.pool_first", "false", "pool_first must be true or false"),
    ("text", "x", "text must be an object"),
    ("text.layer", "x", "text.layer must be a layer number"),
    ("text.layer", True, "text.layer must be a layer number"),
    ("tower.embed_dim", "32", "embed_dim must be a whole number"),
    ("tower.image_size", 32.5, "image_size must be a whole number"),
    ("tower.tower_kwargs", {"width": "96"}, "width must be a number"),
    ("tower.tower_kwargs", {"layers": True}, "layers must be a number"),
    ("text.llm", "org/name", "text.llm must be an object"),
    ("text.positions", "sideways", "positions must be one of"),
    ("text.prompt_sets", [{"name": "raw", "prefix": 3}], r"prompt_sets\[0\] must be"),
    ("tower.unknown_option", 1, "unknown key 'unknown_option'"),
])
def test_ill_typed_config_is_refused(folder, path, value, message):
    edit_config(folder, _set(path, value))
    with pytest.raises(FlameError, match=message):
        FlameModel.load(folder)


def test_pool_first_string_false_does_not_silently_change_the_model(folder):
    """On 8a825a2 "false" was truthy: the model loaded, pooling before the projector."""
    edit_config(folder, _set("tower.pool_first", "false"))
    with pytest.raises(FlameError):
        model = FlameModel.load(folder)
        assert model.tower_config.pool_first is False


_HUGE = """
import resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a runaway allocation fails here, not the machine
from flame.model import FlameModel
from flame.errors import FlameError
for folder in sys.argv[1:]:
    t = time.perf_counter()
    try:
        FlameModel.load(folder)
        print("LOADED")
    except FlameError as e:
        # VmHWM: this process's own peak (ru_maxrss would count the forking pytest's pages)
        peak = int(next(x for x in open("/proc/self/status") if x.startswith("VmHWM")).split()[1])
        print("REFUSED", round(time.perf_counter() - t, 1), peak, e)
    except BaseException as e:
        print("CRASHED", type(e).__name__, str(e)[:200])
"""

HUGE = [  # (config edits, the refusal)
    ({"tower.tower_kwargs": {"width": 65536, "heads": 16}}, "parameters; more than the 4,000,000,000"),
    ({"tower.tower_kwargs": {"layers": 1024, "width": 2048, "heads": 16}}, "parameters; more than"),
    ({"tower.tower_kwargs": {"layers": 100000}}, "layers must be from 1 to 1,024"),
    ({"tower.image_size": 4096}, "patch tokens per image"),
    ({"tower.embed_dim": 1 << 20, "text.dim": 1 << 20}, "dim must be a whole number from 1 to 65,536"),
    ({"tower.proj_hidden": 65536, "tower.embed_dim": 65536, "text.dim": 65536}, "parameters; more than"),
]


def test_absurd_sizes_are_refused_before_any_allocation(tmp_path):
    """Each refused within a 6 GiB address space, with a peak under 2 GiB (8a825a2 allocated the
    tower first: hundreds of GB)."""
    folders = []
    for i, (edits, _) in enumerate(HUGE):
        folder = model_folder(tmp_path / f"m{i}", text_side(SPEC, None))
        for path, value in edits.items():
            edit_config(folder, _set(path, value))
        folders.append(str(folder))
    out = subprocess.run([sys.executable, "-c", _HUGE, *folders], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    lines = out.stdout.splitlines()
    assert len(lines) == len(HUGE), out.stdout + out.stderr[-2000:]
    for line, (_, message) in zip(lines, HUGE, strict=True):
        assert line.startswith("REFUSED") and message in line, line
        _, seconds, peak_kb, _ = line.split(" ", 3)
        assert int(peak_kb) < 2 << 20 and float(seconds) < 60, line


def _run_with_latest(tmp_path, name: str | None, link: Path | None = None) -> tuple[Path, Path]:
    run = tmp_path / "run"
    model_folder(run / "checkpoint-5", text_side(SPEC, None), seed=5)
    other = model_folder(tmp_path / "x", text_side(SPEC, None), seed=99)  # a model from elsewhere
    if link is not None:
        (run / "checkpoint-7").symlink_to(link)
    (run / "latest").write_text((name or "") + "\n")
    return run, other


@pytest.mark.parametrize("latest", ["../x", "ABS", "checkpoint-7"])
def test_latest_naming_a_folder_outside_the_run_is_refused(tmp_path, latest):
    run, other = _run_with_latest(tmp_path, None, link=tmp_path / "x" if latest == "checkpoint-7" else None)
    name = str(other) if latest == "ABS" else latest
    (run / "latest").write_text(name + "\n")
    with pytest.raises(FlameError, match="not a checkpoint folder inside"):
        FlameModel.from_pretrained(run)
    (run / "checkpoints.json").write_text(json.dumps({"written": ["checkpoint-5", name]}))
    (run / "latest").unlink()
    with pytest.raises(FlameError, match="checkpoints.json names"):
        FlameModel.from_pretrained(run)
    (run / "checkpoints.json").write_text(json.dumps({"written": ["checkpoint-5"]}))
    assert FlameModel.from_pretrained(run).source == run / "checkpoint-5"  # a plain name still loads
    assert (other / "model.safetensors").is_file()  # nothing was touched


def test_a_hub_llm_named_by_the_folder_is_not_downloaded(folder, tmp_path, monkeypatch):
    import transformers

    asked = []
    real = transformers.AutoConfig.from_pretrained

    def watch(source, *a, **k):
        asked.append((str(source), k.get("local_files_only")))
        return real(source, *a, **k)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", watch)
    model = FlameModel.from_pretrained(folder, cache_dir=tmp_path / "cache")
    with pytest.raises(FlameError, match=f"names the hub LLM '{SPEC}', which is not in the local Hugging Face cache"):
        model.encode_text(["a cat"])
    assert all(local for _, local in asked)  # never asked the hub
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("*.npy"))


def test_bad_model_folder_through_flame_eval_is_one_line_exit_2(tmp_path, capsys):
    folder = model_folder(tmp_path / "m", text_side(SPEC, None))
    table = caption_table(tmp_path / "t", ["a red car", "a dog"])
    for edit, message in ((_set("tower.tower_kwargs", {"checkpoint_path": "/etc/passwd"}), "is refused"),
                          (_set("tower.pool_first", "false"), "pool_first must be true or false"),
                          (_set("tower.tower_kwargs", {"width": 65536, "heads": 16}), "parameters")):
        edit_config(folder, edit)
        r = run_flame(capsys, "eval", "--model", folder, "--dataset", table, "--task", "retrieval",
                      "--output", tmp_path / "r.json", "--workers", "0", "--no-progress")
        assert r.code == 2 and message in r.error
        edit_config(folder, _set("tower.tower_kwargs", {}))
        edit_config(folder, _set("tower.pool_first", False))
    run, _ = _run_with_latest(tmp_path / "r", "../x")
    r = run_flame(capsys, "eval", "--model", run, "--dataset", table, "--task", "retrieval",
                  "--output", tmp_path / "r.json", "--workers", "0", "--no-progress")
    assert r.code == 2 and "not a checkpoint folder inside" in r.error
    assert not (tmp_path / "r.json").exists()


_CACHED_HUB = """
import sys
from flame.textenc import TextEncoder
from support.untrusted import text_side
enc = TextEncoder(text_side("tiny-org/tiny-llm", None), cache_dir=sys.argv[1], device="cpu")
print("OK", tuple(enc.encode(["a cat"]).shape), enc.identity.split(":")[0])
"""


def test_a_hub_llm_in_the_local_cache_is_used_offline(tiny_llm_dir, tmp_path):
    """The allowed case: the hub id's snapshot is in the local Hugging Face cache (offline)."""
    import shutil

    repo = tmp_path / "hub" / "models--tiny-org--tiny-llm"
    shutil.copytree(tiny_llm_dir, repo / "snapshots" / "c0ffee")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "HF_HUB_CACHE": str(tmp_path / "hub"),
           "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _CACHED_HUB, str(tmp_path / "cache")], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.stdout.strip() == "OK (1, 32) weights", out.stdout + out.stderr[-1500:]
