"""`flame embed --import-release`: the FLAME release's per-image .pth files (11 x D fp16, in
its `{key[:5]}/{key}.pth` layout) -> a normal store with the same vectors; missing files,
resume, and a malicious pickle that must be refused without running."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.commands import one_line, run_flame
from support.embed_data import FAKE_JPEG, make_shards, store_files
from support.payloads import Evil

from flame.cli import main
from flame.store import EmbeddingStore

D = 64
MISSING = {"000000003", "000100001"}  # keys whose release file is absent


def _write_release(root: Path, keys: list[str], seed: int = 0, layout=lambda k: k[:5]) -> dict[str, torch.Tensor]:
    """What the release's embedding script writes: a batch [N, 11, D] normalised in fp16,
    one torch.save per image of that image's row, at ROOT/{layout(key)}/{key}.pth."""
    g = torch.Generator().manual_seed(seed)
    batch = F.normalize(torch.randn(len(keys), 11, D, generator=g).half(), dim=-1)
    out = {}
    for key, row in zip(keys, batch):
        path = root / layout(key) / f"{key}.pth"
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(row, path)
        out[key] = row.clone()
    return out


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    shards = make_shards(root / "shards", n_shards=2, per_shard=5, repeat=False)
    keys = [k for rows in shards.values() for k, *_ in rows]
    vectors = _write_release(root / "emb", [k for k in keys if k not in MISSING])
    return root, shards, vectors


def _run(capsys, *args):
    return run_flame(capsys, "embed", *args)


def _import(capsys, root, out, *extra):
    return _run(capsys, "--import-release", root / "emb", "--data", root / "shards", "--out", out, *extra)


def test_import_fp16_is_bit_exact_and_describes_the_release(tmp_path, capsys, release):
    root, shards, vectors = release
    code, out, err = _import(capsys, root, tmp_path / "store")
    assert code == 0, err
    assert "10 samples" not in out and "8 samples" in out and "2 samples missing an embedding file" in out
    store = EmbeddingStore(tmp_path / "store")
    assert store.shards == list(shards) and store.k == 11 and store.dim == D and store.dtype == "fp16"
    for name, rows in shards.items():
        keys = [k for k, *_ in rows if k not in MISSING]
        assert store.keys(name) == keys  # tar order, missing samples left out
        want = torch.stack([vectors[k] for k in keys]).numpy()
        assert store.array(name).dtype == np.float16
        assert store.array(name).tobytes() == want.tobytes()  # bit-exact
        assert np.array_equal(store.get(name, np.arange(len(keys))), want.astype(np.float32))
    m = store.manifest
    assert m["llm"] == {"spec": "mistralai/Mistral-Nemo-Instruct-2407", "fingerprint": None}
    assert m["layer"] == [39] and m["positions"] == "continue" and m["normalized"] is True
    assert [s["name"] for s in m["prompt_sets"]] == ["raw", "short", "long"]  # the release's row order
    assert [len(s["facets"]) for s in m["prompt_sets"]] == [1, 3, 7]
    assert m["facets"] == ["raw/0"] + [f"short/{i}" for i in range(3)] + [f"long/{i}" for i in range(7)]


def test_import_int8_keeps_cosine(tmp_path, capsys, release):
    root, shards, vectors = release
    code, _, err = _import(capsys, root, tmp_path / "store", "--dtype", "int8")
    assert code == 0, err
    store = EmbeddingStore(tmp_path / "store")
    assert store.dtype == "int8"
    for name in shards:
        keys = store.keys(name)
        got = torch.from_numpy(store.get(name, np.arange(len(keys))))
        want = torch.stack([vectors[k] for k in keys]).float()
        assert F.cosine_similarity(got, want, dim=-1).min().item() >= 0.999


def test_rerun_skips_complete_shards_and_redoes_an_incomplete_one(tmp_path, capsys, release):
    root, shards, _ = release
    out = tmp_path / "store"
    assert _import(capsys, root, out)[0] == 0
    before = store_files(out)
    # every store file is left alone (STORE/.lock is not store data: each job writes its holder there)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}
    code, text, _ = _import(capsys, root, out)
    assert code == 0 and "shards 0 done / 2 skipped" in text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"} == mtimes
    # a shard whose keys file never got written is incomplete: only it is redone, to the same bytes
    (out / "shards" / "data-0001.keys.json").unlink()
    (out / "shards" / "data-0001.npy.tmp").write_bytes(b"half a shard")  # left by a killed run
    code, text, _ = _import(capsys, root, out)
    assert code == 0 and "shards 1 done / 1 skipped" in text
    assert store_files(out) == before


def test_missing_file_with_on_missing_error_is_one_line(tmp_path, capsys, release):
    root, _, _ = release
    code, _, err = _import(capsys, root, tmp_path / "store", "--on-missing", "error")
    assert code == 2
    line = one_line(err)
    assert "000000003" in line and "--on-missing skip" in line


def test_yfcc_layout_is_found(tmp_path, capsys):
    import webdataset as wds

    keys = ["1234_567", "1234_568", "98_1"]
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "y-000.tar")) as w:
        for k in keys:
            w.write({"__key__": k, "jpg": FAKE_JPEG, "txt": "a photo"})
    vectors = _write_release(tmp_path / "emb", keys, layout=lambda k: k.split("_")[0])
    assert (tmp_path / "emb" / "1234" / "1234_567.pth").is_file()
    code, out, err = _import(capsys, tmp_path, tmp_path / "store", "--release-layout", "yfcc15m")
    assert code == 0, err
    store = EmbeddingStore(tmp_path / "store")
    assert store.keys("y-000") == keys
    assert np.array_equal(store.get("y-000", np.arange(3)), torch.stack([vectors[k] for k in keys]).float().numpy())


def test_malicious_pickle_is_refused_not_run(tmp_path, capsys, release):
    root, shards, _ = release
    emb = tmp_path / "emb"
    os.symlink(root / "shards", tmp_path / "shards")
    _write_release(emb, [k for rows in shards.values() for k, *_ in rows])
    marker = tmp_path / "payload-ran"
    evil = emb / "00010" / "000100002.pth"
    torch.save(Evil(marker), evil)
    # the payload is live: an unsafe load runs it
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()

    code, _, err = _import(capsys, tmp_path, tmp_path / "store")
    assert code == 2
    line = one_line(err)
    assert "refused" in line and str(evil) in line and "exec" in line
    assert not marker.exists()  # never executed
    store = EmbeddingStore(tmp_path / "store")
    assert store.shards == ["data-0000"]  # the shard before it is complete; the bad one left nothing
    assert not list((tmp_path / "store" / "shards").glob("data-0001*"))


def test_bad_inputs_are_one_line(tmp_path, capsys, release):
    root, _, _ = release
    data = ["--data", root / "shards", "--out", tmp_path / "s"]
    code, _, err = _run(capsys, "--import-release", tmp_path / "nope", *data)
    assert code == 2 and "not a folder" in one_line(err)
    (tmp_path / "empty").mkdir()
    code, _, err = _run(capsys, "--import-release", tmp_path / "empty", *data)
    assert code == 2 and "no release embedding files" in one_line(err)
    assert not (tmp_path / "s").exists()  # nothing half-made is left behind
    # a file that is not an [11, D] tensor
    emb = tmp_path / "odd"
    (emb / "00000").mkdir(parents=True)
    torch.save({"not": "a tensor"}, emb / "00000" / "000000000.pth")
    code, _, err = _run(capsys, "--import-release", emb, *data)
    assert code == 2 and "expected a float tensor" in one_line(err)
    code, _, err = _run(capsys, "--import-release", root / "emb", *data, "--prompts", "long=txt")
    assert code == 2 and "do not apply" in one_line(err)


@pytest.mark.slow
def test_flame_train_uses_an_imported_store(tmp_path, capsys):
    """Release files for real image shards -> import -> `flame train` runs on the store and its
    checkpoint carries the release's text side (what `flame convert` writes too)."""
    import webdataset as wds

    from flame.data.synthetic import write_shards
    from flame.model import FlameModel
    from flame.release import release_text_side

    shards = write_shards(tmp_path / "shards", 16, shard_size=8, size=32, seed=0)
    keys = []
    for p in shards:
        keys += [s["__key__"] for s in wds.WebDataset(str(p), shardshuffle=False)]
    _write_release(tmp_path / "emb", keys)
    code, _, err = _import(capsys, tmp_path, tmp_path / "store")
    assert code == 0, err
    capsys.readouterr()
    code = main([
        "train", "--data", str(tmp_path / "shards"), "--embeddings", str(tmp_path / "store"), "--out",
        str(tmp_path / "run"), "--tower", "vit-tiny", "--image-size", "32", "--proj-hidden", "32", "--no-progress",
        "--no-tensorboard", "--batch-size", "8", "--workers", "0", "--steps", "2", "--save-every", "2",
    ])
    assert code == 0, capsys.readouterr().err
    model = FlameModel.from_pretrained(tmp_path / "run")
    assert model.text == release_text_side(D)
    assert model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, D)


def test_non_finite_vectors_fail_their_shard_only(tmp_path, capsys, release):
    root, shards, _ = release
    os.symlink(root / "shards", tmp_path / "shards")
    emb = tmp_path / "emb"
    _write_release(emb, [k for rows in shards.values() for k, *_ in rows])
    bad = torch.load(emb / "00010" / "000100002.pth")
    bad[4, 7] = float("nan")
    torch.save(bad, emb / "00010" / "000100002.pth")
    code, out, err = _import(capsys, tmp_path, tmp_path / "store")
    assert code == 2 and "shards 1 done" in out
    line = [ln for ln in err.splitlines() if "error:" in ln][0]
    assert "data-0001" in line and "non-finite" in line and "'000100002'" in line
    assert EmbeddingStore(tmp_path / "store").shards == ["data-0000"]


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [4, 6])
def test_sigkilled_import_resumes_to_the_same_bytes(tmp_path, capsys, release, kill_at):
    """SIGKILL at a durable step (fileio's fault hook: 4 = after shard 0's array rename, before
    its keys; 6 = right after shard 0 completes), rerun: the store equals an uninterrupted one."""
    from support.embed_data import flame

    root, _, _ = release
    assert _import(capsys, root, tmp_path / "clean")[0] == 0
    args = ["embed", "--import-release", root / "emb", "--data", root / "shards", "--out", tmp_path / "store"]
    killed = flame(*args, env={"FLAME_TEST_KILL_AT": str(kill_at)})
    assert killed.returncode == -9, killed.stderr
    again = flame(*args)
    assert again.returncode == 0, again.stderr
    assert ("1 skipped" if kill_at == 6 else "0 skipped") in again.stdout
    assert store_files(tmp_path / "store") == store_files(tmp_path / "clean")
