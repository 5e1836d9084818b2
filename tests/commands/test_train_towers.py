"""flame train with a pretrained, locked tower (LiT / ShareLock): --tower-init from a local
Hugging Face cache, --lock-image keeps the trunk bit-identical while the projector trains and
the optimizer holds state for the trainable parameters only; --lock-image-unlocked N trains the
last N blocks too; what does not fit is one line, exit 2."""

from __future__ import annotations

import os
import subprocess

import pytest
import torch
from support.commands import TORCHRUN_2, run_flame
from support.towers import put_in_hub_cache, save_open_clip, tiny_clip, trunk_keys_of_clip
from support.training import TINY, make_set, weights

from flame.train import load_state

REPO = "flame-test/tiny-clip"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The tiny image set and store, and a tiny open_clip CLIP (vit-tiny's shape at 32 px) saved
    by open_clip for the hub, in a local Hugging Face cache."""
    root = make_set(tmp_path_factory.mktemp("towers"))
    clip, cfg = tiny_clip(seed=1)
    save_open_clip(clip, cfg, root / "clip")
    put_in_hub_cache(root / "hub", REPO, root / "clip")
    small, cfg = tiny_clip(seed=1, image_size=64)  # pretrained at another resolution
    save_open_clip(small, cfg, root / "clip64")
    return {"root": root, "clip": clip, "cache": root / "hub"}


@pytest.fixture
def hub(world, monkeypatch):
    """huggingface_hub reads the test's cache and nothing else (offline)."""
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(world["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return world


def _argv(root, out, *extra):
    return ["train", "--data", root / "shards", "--embeddings", root / "store", "--out", out, *TINY,
            "--batch-size", "8", "--workers", "0", "--log-every", "10", *extra]


def _trainable_numel(w, prefixes):
    return sum(v.numel() for k, v in w.items() if k.startswith(prefixes))


def _optimizer_numel(state):
    opt = state["optimizer"]
    n_params = sum(len(g["params"]) for g in opt["param_groups"])
    assert len(opt["state"]) == n_params  # every parameter the optimizer holds was stepped
    return n_params, sum(s["exp_avg"].numel() for s in opt["state"].values())


TRAINED = ("visual.projector.", "logit_scale", "logit_bias")


@pytest.mark.slow
def test_a_locked_pretrained_trunk_is_bit_identical_after_20_steps(hub, tmp_path, capsys):
    out = tmp_path / "run"
    r = run_flame(capsys, *_argv(hub["root"], out, "--steps", "20", "--save-every", "10",
                                 "--tower-init", f"hf-hub:{REPO}", "--lock-image"))
    assert r.code == 0, r.err
    pretrained = trunk_keys_of_clip(hub["clip"])
    at10, at20 = weights(out / "checkpoint-10"), weights(out / "checkpoint-20")
    trunk = {k for k in at20 if k.startswith("visual.trunk.")}
    assert trunk == set(pretrained)
    assert all(torch.equal(at20[k], pretrained[k]) and torch.equal(at10[k], pretrained[k]) for k in trunk)
    projector = [k for k in at20 if k.startswith("visual.projector.")]
    assert projector and all(not torch.equal(at10[k], at20[k]) for k in projector)
    n_params, numel = _optimizer_numel(load_state(out / "checkpoint-20"))
    assert n_params == len(projector) + 2  # the projector's tensors + logit scale and bias, no trunk tensor
    assert numel == _trainable_numel(at20, TRAINED)
    # the lock is one of the settings a resume must keep
    r = run_flame(capsys, *_argv(hub["root"], out, "--steps", "30", "--tower-init", f"hf-hub:{REPO}", "--resume"))
    assert r.code == 2 and "settings differ" in r.error and "lock_image: True -> False" in r.error


@pytest.mark.slow
def test_lock_image_unlocked_1_trains_the_last_block_only(hub, tmp_path, capsys):
    out = tmp_path / "run"
    r = run_flame(capsys, *_argv(hub["root"], out, "--steps", "20", "--save-every", "20",
                                 "--tower-init", f"hf-hub:{REPO}", "--lock-image", "--lock-image-unlocked", "1"))
    assert r.code == 0, r.err
    pretrained, w = trunk_keys_of_clip(hub["clip"]), weights(out / "checkpoint-20")
    last = "visual.trunk.vit.transformer.resblocks.2."
    changed = {k for k in pretrained if not torch.equal(w[k], pretrained[k])}
    assert changed == {k for k in pretrained if k.startswith(last)}  # every tensor of the last block, nothing else
    n_params, numel = _optimizer_numel(load_state(out / "checkpoint-20"))
    assert numel == _trainable_numel(w, (*TRAINED, last))


@pytest.mark.parametrize("case,expect", [
    ("shape", "shape mismatch for positional_embedding: checkpoint (65, 96) vs tower (17, 96)"),
    ("not cached", f"hf-hub:{REPO}-absent: {REPO}-absent has none of open_clip_model.safetensors"),
    ("no file", "does not exist"),
])
def test_a_checkpoint_that_does_not_fit_or_is_missing_is_one_line_exit_2(hub, tmp_path, capsys, case, expect):
    spec = {"shape": hub["root"] / "clip64", "not cached": f"hf-hub:{REPO}-absent",
            "no file": tmp_path / "nothing.safetensors"}[case]
    out = tmp_path / "run"
    r = run_flame(capsys, *_argv(hub["root"], out, "--steps", "2", "--tower-init", spec))
    assert r.code == 2 and expect in r.error
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_torchrun_two_processes_with_a_partly_locked_trunk(hub, tmp_path):
    """DDP over the trainable parameters only: two gloo ranks step the last block and the
    projector and leave the rest of the pretrained trunk as it was."""
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_CACHE=str(hub["cache"]), HF_HUB_OFFLINE="1")
    cmd = [*TORCHRUN_2, "-m", "flame",
           *map(str, _argv(hub["root"], out, "--steps", "3", "--warmup", "1", "--tower-init", f"hf-hub:{REPO}",
                           "--lock-image-unlocked", "1"))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    pretrained, w = trunk_keys_of_clip(hub["clip"]), weights(out / "checkpoint-3")
    last = "visual.trunk.vit.transformer.resblocks.2."
    assert {k for k in pretrained if not torch.equal(w[k], pretrained[k])} == {k for k in pretrained
                                                                                if k.startswith(last)}
    n_params, numel = _optimizer_numel(load_state(out / "checkpoint-3"))
    assert numel == _trainable_numel(w, (*TRAINED, last))
