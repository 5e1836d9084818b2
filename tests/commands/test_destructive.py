"""Commands that replace folders delete only what they made (issue 18, item 6): each is pointed
at the user's own data, must refuse with one line and exit 2, and leave every file as it was."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from support.commands import run_flame
from support.search_data import photo, save_tiny_model
from torch import nn

from flame.errors import FlameError


def _tree(root: Path) -> dict[str, str]:
    """Every file under root -> a digest of its bytes."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_llm_dir) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "ckpt", tiny_llm_dir)


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    for i, rel in enumerate(["a.png", "b.png", "trip/c.png"]):
        photo(root / rel, i)
    return root


# ---- flame search index --rebuild --------------------------------------------------------------
def _embed_store(path: Path) -> Path:
    """A store as `flame embed` leaves it: manifest, two complete shards."""
    import numpy as np

    from flame.store import EmbeddingStore

    store = EmbeddingStore.create(path, {"kind": "facets", "llm": {"spec": "x", "fingerprint": "f"}, "facets": ["a"],
                                         "k": 1, "dim": 32, "dtype": "fp16", "normalized": True})
    for n in ("data-0000", "data-0001"):
        v = np.random.default_rng(0).standard_normal((3, 1, 32)).astype(np.float32)
        store.write_shard(n, [f"{n}-{i}" for i in range(3)], v / np.linalg.norm(v, axis=-1, keepdims=True))
    return path


def test_rebuild_pointed_at_an_embedding_store_is_refused(photos, model_dir, tmp_path, capsys):
    store = _embed_store(tmp_path / "cc3m-store")
    before = _tree(store)
    r = run_flame(capsys, "search", "index", photos, "--model", model_dir, "--index", store, "--rebuild",
                  "--no-progress", "--workers", "0")
    assert r.code == 2
    assert "is not a flame search index" in r.error and "flame embed store with 2 complete shards" in r.error
    assert _tree(store) == before  # every shard still there, byte for byte
    # without --rebuild too
    r = run_flame(capsys, "search", "index", photos, "--model", model_dir, "--index", store, "--no-progress")
    assert r.code == 2 and "is not a flame search index" in r.error
    assert _tree(store) == before
    # a folder of the user's that is no store at all: refused, nothing made in it
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "taxes.pdf").write_text("keep")
    r = run_flame(capsys, "search", "index", photos, "--model", model_dir, "--index", mine, "--no-progress")
    assert r.code == 2 and "is not a flame search index (it holds 'taxes.pdf')" in r.error
    assert _tree(mine) == {"taxes.pdf": hashlib.sha256(b"keep").hexdigest()}


def test_rebuild_still_replaces_a_search_index(photos, model_dir, tmp_path, capsys):
    index = tmp_path / "idx"
    assert run_flame(capsys, "search", "index", photos, "--model", model_dir, "--index", index, "--no-progress",
                     "--workers", "0").code == 0
    r = run_flame(capsys, "search", "index", photos, "--model", model_dir, "--index", index, "--no-progress",
                  "--workers", "0", "--rebuild")
    assert r.code == 0 and "3 photos: 3 encoded, 0 unchanged" in r.out


# ---- an empty (unmounted) photo folder against a full index -----------------------------------
def test_an_empty_photo_folder_does_not_forget_the_index(photos, model_dir, tmp_path, capsys):
    index = tmp_path / "elsewhere" / "idx"
    args = ["--model", model_dir, "--index", index, "--no-progress", "--workers", "0"]
    assert run_flame(capsys, "search", "index", photos, *args).code == 0
    before = _tree(index)
    mountpoint = tmp_path / "mnt"  # what an unmounted disk looks like: an empty folder
    mountpoint.mkdir()
    r = run_flame(capsys, "search", "index", mountpoint, *args)
    assert _tree(index) == before  # no shard deleted, no entry forgotten
    assert r.code == 2
    assert "holds no photos but index" in r.error and "has 3" in r.error and "--allow-empty" in r.error
    from flame.search import index_entries

    assert sorted(index_entries(index)) == ["a.png", "b.png", "trip/c.png"]
    # a folder with only non-photos is as empty
    (mountpoint / "notes.txt").write_text("x")
    assert run_flame(capsys, "search", "index", mountpoint, *args).code == 2
    assert _tree(index) == before
    # asked for: everything is forgotten
    r = run_flame(capsys, "search", "index", mountpoint, *args, "--allow-empty")
    assert r.code == 0 and "0 photos: 0 encoded, 0 unchanged, 0 unreadable (skipped), 3 removed" in r.out
    assert index_entries(index) == {}


# ---- flame convert --overwrite ----------------------------------------------------------------
def _release_checkpoint(path: Path) -> Path:
    """A tiny checkpoint in the FLAME release's layout (open_clip ViT + mm projector)."""
    from open_clip.transformer import LayerNorm, VisionTransformer

    torch.manual_seed(0)
    visual = VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=2, mlp_ratio=4.0, output_dim=16)
    mm = nn.Sequential(nn.Linear(64, 4096), nn.GELU(), nn.Linear(4096, 48), LayerNorm(48))
    state = {**{f"visual.{k}": v for k, v in visual.state_dict().items()},
             **{f"mm.{k}": v for k, v in mm.state_dict().items()},
             "logit_scale": torch.tensor(math.log(10.0)), "logit_bias": torch.tensor(-10.0)}
    torch.save(state, path)
    return path


RELEASE_JSON = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32, "pool_type": "avg"},
    "mm_cfg": {"mm_projector": True, "width": 64, "mlp_depth": 2, "projector_dim": 48},
    "text_cfg": {"context_length": 1024, "llm_model_name": "mistralai/Mistral-Nemo-Instruct-2407",
                 "llm_tokenizer_name": "mistralai/Mistral-Nemo-Instruct-2407", "layer": "39",
                 "load_in_8bit": False, "embedding_method": "multiprompteol"},
    "custom_text": True,
}


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("release")
    (root / "tiny.json").write_text(json.dumps(RELEASE_JSON))
    return [_release_checkpoint(root / "epoch_32.pt"), "--config", root / "tiny.json"]


def test_convert_overwrite_refuses_a_folder_of_user_files(release, tmp_path, capsys):
    out = tmp_path / "thesis"
    (out / "chapters").mkdir(parents=True)
    (out / "chapters" / "1.tex").write_text("years of work")
    (out / "config.json").write_text('{"my": "settings"}')
    before = _tree(out)
    r = run_flame(capsys, "convert", *release, "--out", out, "--overwrite")
    assert r.code == 2 and "is not a FLAME model folder" in r.error and "'chapters'" in r.error
    assert _tree(out) == before
    # a folder with only a config.json of the user's: refused too
    (out / "chapters" / "1.tex").unlink()
    (out / "chapters").rmdir()
    r = run_flame(capsys, "convert", *release, "--out", out, "--overwrite")
    assert r.code == 2 and "no config.json of format flame-model" in r.error
    assert (out / "config.json").read_text() == '{"my": "settings"}'
    # a file is not replaced either
    (tmp_path / "notes.txt").write_text("keep")
    r = run_flame(capsys, "convert", *release, "--out", tmp_path / "notes.txt", "--overwrite")
    assert r.code == 2 and (tmp_path / "notes.txt").read_text() == "keep"
    assert not list(tmp_path.glob(".*tmp-*")) and not list(tmp_path.glob(".*old-*"))


def test_convert_overwrite_replaces_a_converted_model(release, tmp_path, capsys):
    out = tmp_path / "flame"
    assert run_flame(capsys, "convert", *release, "--out", out).code == 0
    before = _tree(out)
    assert run_flame(capsys, "convert", *release, "--out", out, "--overwrite").code == 0
    assert sorted(_tree(out)) == sorted(before) == ["config.json", "model.safetensors"]


# ---- flame demo --out . ------------------------------------------------------------------------
@pytest.mark.parametrize("theirs", ["runs/exp-42/checkpoint-9000/model.safetensors", "store/manifest.json",
                                    "cache/images/abc.npy"])
def test_demo_out_dot_leaves_the_users_folders_alone(theirs, tmp_path, capsys, monkeypatch):
    """`flame demo --out .` in a project folder with its own runs/ (or store/, cache/images/,
    data/): refused before any stage runs (a stage would replace them)."""
    (tmp_path / theirs).parent.mkdir(parents=True)
    (tmp_path / theirs).write_text("the user's")
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)

    def stop(self, st):  # after stage 1 (where stale outputs are replaced): keeps the test short
        raise FlameError("stopped after stage 1 by the test")

    monkeypatch.setattr("flame.demo.pipeline.Demo._llm", stop)
    r = run_flame(capsys, "demo", "--out", ".", "--quick", "--no-progress")
    assert (tmp_path / theirs).is_file() and _tree(tmp_path) == before  # nothing removed, nothing written
    assert r.code == 2
    assert f"already holds {theirs.split('/')[0] if not theirs.startswith('cache') else 'cache/images'}/" in r.error
    assert "flame demo did not make" in r.error


def test_demo_claims_a_new_folder_and_reuses_its_own(tmp_path):
    from flame.demo.pipeline import OWN_MARK, claim_out

    out = tmp_path / "demo"
    claim_out(out)
    assert (out / OWN_MARK).is_file()
    (out / "runs" / "flame").mkdir(parents=True)  # the demo's own run
    claim_out(out)  # its own folder: accepted
    legacy = tmp_path / "old-demo"  # a demo folder made before the mark existed
    (legacy / "stages").mkdir(parents=True)
    (legacy / "stages" / "llm.json").write_text("{}")
    (legacy / "runs").mkdir()
    claim_out(legacy)
    assert (legacy / OWN_MARK).is_file()
    user = tmp_path / "project"
    (user / "runs").mkdir(parents=True)
    with pytest.raises(FlameError, match="already holds runs/"):
        claim_out(user)
    assert not (user / OWN_MARK).exists()
