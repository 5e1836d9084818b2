"""Hugging Face Hub support (issue 19 item 1): from_pretrained by repo id / revision through
huggingface_hub's cache with HF_HUB_OFFLINE=1, save_pretrained, push_to_hub with the upload
intercepted, the model card read back by huggingface_hub, pickles refused, `flame push`."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from support.commands import run_flame
from support.hub import FakeHub, cache_commit, go_offline, scanned
from support.untrusted import model_folder, text_side

from flame.errors import FlameError
from flame.model import FlameModel

REPO = "flame-org/tiny"
FIXTURE_RUN = Path(__file__).parents[1] / "fixtures" / "v0" / "run"


def _images() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _commit(seed: int) -> str:
    return hashlib.sha1(f"commit {seed}".encode()).hexdigest()


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1, and no network connection may be opened (`go_offline`)."""
    return go_offline(monkeypatch)


@pytest.fixture
def models(tmp_path) -> tuple[Path, Path]:
    """Two different saved models (the repo's old and new commit)."""
    text = text_side("org/some-llm", None)
    return model_folder(tmp_path / "old", text, seed=1), model_folder(tmp_path / "new", text, seed=2)


@pytest.fixture
def hub_cache(tmp_path, models) -> Path:
    """REPO in a Hub cache: commit 1 = `old` (tag v1), commit 2 = `new` (main)."""
    cache = tmp_path / "hub"
    cache_commit(cache, REPO, models[0], _commit(1), refs=("v1",))
    cache_commit(cache, REPO, models[1], _commit(2), refs=("main",))
    assert scanned(cache, REPO) == {_commit(1): {"config.json", "model.safetensors"},
                                   _commit(2): {"config.json", "model.safetensors"}}
    return cache


def _vectors(model_or_spec, **kw) -> torch.Tensor:
    model = model_or_spec if isinstance(model_or_spec, FlameModel) else FlameModel.from_pretrained(model_or_spec, **kw)
    return model.encode_image(_images())


# ---- loading from the Hub cache ---------------------------------------------------------
def test_repo_id_and_revisions_load_what_the_local_folders_hold(offline, hub_cache, models, monkeypatch):
    old, new = (_vectors(m) for m in models)
    assert not torch.equal(old, new)
    assert torch.equal(_vectors(REPO, hub_cache_dir=hub_cache), new)  # main
    assert torch.equal(_vectors(REPO, hub_cache_dir=hub_cache, revision="v1"), old)  # a tag
    assert torch.equal(_vectors(REPO, hub_cache_dir=hub_cache, revision=_commit(1)), old)  # a commit
    assert torch.equal(_vectors(f"hf-hub:{REPO}@v1", hub_cache_dir=hub_cache), old)  # open_clip's spelling
    # without hub_cache_dir: huggingface_hub's own default cache (HF_HUB_CACHE)
    monkeypatch.setattr(offline, "HF_HUB_CACHE", str(hub_cache))
    model = FlameModel.from_pretrained(REPO)
    assert torch.equal(_vectors(model), new)
    assert model.source == hub_cache / "models--flame-org--tiny" / "snapshots" / _commit(2)
    assert model.fingerprint == FlameModel.from_pretrained(models[1]).fingerprint


def test_only_the_model_files_are_asked_for(offline, hub_cache, monkeypatch):
    import huggingface_hub

    asked = []
    real = huggingface_hub.snapshot_download

    def spy(*args, **kw):
        asked.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    FlameModel.from_pretrained(REPO, hub_cache_dir=hub_cache, revision="v1")
    assert asked[0]["allow_patterns"] == ["config.json", "model.safetensors"] and asked[0]["revision"] == "v1"


def test_an_existing_local_path_wins_over_a_repo_id(offline, hub_cache, models, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(models[0], tmp_path / REPO)
    assert torch.equal(_vectors(REPO, hub_cache_dir=hub_cache), _vectors(models[0]))
    with pytest.raises(FlameError, match="applies to Hugging Face repos"):
        FlameModel.from_pretrained(REPO, revision="v1")


@pytest.mark.parametrize("spec,revision", [("flame-org/absent", None), (REPO, "no-such-branch")])
def test_offline_with_nothing_cached_is_one_line(offline, hub_cache, spec, revision):
    with pytest.raises(FlameError) as e:
        FlameModel.from_pretrained(spec, hub_cache_dir=hub_cache, revision=revision)
    msg = str(e.value)
    assert "\n" not in msg and spec in msg and "HF_HUB_OFFLINE is set" in msg and str(hub_cache) in msg


def test_offline_command_with_an_empty_cache_is_one_line_exit_2(offline, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(offline, "HF_HUB_CACHE", str(tmp_path / "empty"))
    r = run_flame(capsys, "push", "flame-org/absent", REPO, "--dry-run", tmp_path / "out")
    assert r.code == 2 and "HF_HUB_OFFLINE" in r.error and not (tmp_path / "out").exists()


@pytest.mark.parametrize("spec", ["hf-hub:not a repo", "hf-hub:a/b/c", "hf-hub:/name", "hf-hub:org/na--me"])
def test_a_bad_repo_id_is_one_line(spec):
    with pytest.raises(FlameError, match="is not a Hugging Face repo id") as e:
        FlameModel.from_pretrained(spec)
    assert "\n" not in str(e.value)


# ---- safetensors only ---------------------------------------------------------------------
def _pickled(folder: Path, models, marker: Path) -> Path:
    """A model folder whose weights are a pickle that would run code (write `marker`) if unpickled."""
    from tests.support.payloads import Evil

    folder.mkdir()
    shutil.copy(models[0] / "config.json", folder / "config.json")
    torch.save({"visual.weight": Evil(marker)}, folder / "pytorch_model.bin")
    return folder


def test_a_folder_or_repo_with_a_pickle_instead_of_safetensors_is_refused(offline, tmp_path, models):
    ran = tmp_path / "ran"
    folder = _pickled(tmp_path / "pickled", models, ran)
    for spec in (folder, str(folder)):
        with pytest.raises(FlameError, match=r"has no model.safetensors, only pytorch_model.bin: a pickle") as e:
            FlameModel.from_pretrained(spec)
        assert "\n" not in str(e.value)
    weights_only = tmp_path / "weights-only"
    weights_only.mkdir()
    shutil.copy(folder / "pytorch_model.bin", weights_only / "model.pt")
    with pytest.raises(FlameError, match="only model.pt: a pickle"):
        FlameModel.from_pretrained(weights_only)
    cache = tmp_path / "hub"
    cache_commit(cache, "flame-org/pickled", folder, _commit(3))
    with pytest.raises(FlameError, match="flame-org/pickled .*has no model.safetensors, only pytorch_model.bin"):
        FlameModel.from_pretrained("flame-org/pickled", hub_cache_dir=cache)
    assert not ran.exists()


# ---- save_pretrained ----------------------------------------------------------------------
def test_save_pretrained_round_trips_bit_identically(tmp_path, models):
    from huggingface_hub import ModelCard

    model = FlameModel.from_pretrained(models[1])
    out = model.save_pretrained(tmp_path / "shared")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    back = FlameModel.from_pretrained(out)
    a, b = model.state_dict(), back.state_dict()
    assert list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert back.config() == model.config() and torch.equal(_vectors(back), _vectors(model))
    assert ModelCard.load(out / "README.md").data.library_name == "flame"
    model.save_pretrained(out)  # a model folder is replaced
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FlameError, match="holds 'notes.txt', so it is not a model folder"):
        model.save_pretrained(tmp_path / "mine")
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


# ---- push_to_hub and the model card --------------------------------------------------------
def _eval_files(tmp_path) -> list[Path]:
    """Results in `flame eval --output`'s shape (CLIP_benchmark's): one result, and a suite's list."""
    one = {"dataset": "/data/shapes-classes", "model": "/runs/x/checkpoint-4", "task": "zeroshot_classification",
           "language": "en", "prompts": "raw", "templates": 2, "classes": 3,
           "metrics": {"acc1": 0.625, "acc5": 1.0, "mean_per_class_recall": 0.5833333}, "images": 8,
           "skipped_images": 0}
    suite = [{"dataset": "captions", "model": "m", "task": "zeroshot_retrieval", "language": "en", "prompts": "long",
              "metrics": {"image_retrieval_recall@1": 0.25, "image_retrieval_recall@5": 0.75,
                          "text_retrieval_recall@1": 0.5, "text_retrieval_recall@5": float("nan")}}]
    (tmp_path / "cls.json").write_text(json.dumps(one))
    (tmp_path / "suite.json").write_text(json.dumps(suite).replace("NaN", "null"))
    return [tmp_path / "cls.json", tmp_path / "suite.json"]


@pytest.fixture
def run(tmp_path) -> Path:
    """A run folder as `flame train` wrote it (the format fixtures' run, with its train-config.json)."""
    shutil.copytree(FIXTURE_RUN, tmp_path / "run")
    return tmp_path / "run"


def _check_card(readme: Path, model: FlameModel) -> str:
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard.load(readme)
    meta = metadata_load(readme)
    assert meta == card.data.to_dict()
    name, results = model_index_to_eval_results(meta["model-index"])
    got = {(r.dataset_name, r.task_type, r.metric_type): r.metric_value for r in results}
    assert name == "tiny" and got == {
        ("shapes-classes", "zero-shot-image-classification", "acc1"): 0.625,
        ("shapes-classes", "zero-shot-image-classification", "acc5"): 1.0,
        ("shapes-classes", "zero-shot-image-classification", "mean_per_class_recall"): 0.583333,
        ("captions", "zero-shot-retrieval", "image_retrieval_recall@1"): 0.25,
        ("captions", "zero-shot-retrieval", "image_retrieval_recall@5"): 0.75,
        ("captions", "zero-shot-retrieval", "text_retrieval_recall@1"): 0.5}
    text = card.text
    llm, sets = model.text["llm"]["spec"], model.text["prompt_sets"]
    assert f"| LLM | {Path(llm).name} |" in text and f"| hidden-state layer | {model.text['layer'][0]} |" in text
    assert all(f"`{f}`" in text for s in sets for f in s["facets"]) and f"`{sets[1]['prefix']}`" in text
    assert "| optimizer steps | 6 |" in text and "| lr | 0.001 |" in text and "| shard names | shapes-00000" in text
    assert "/data/" not in text and "/runs/" not in text  # local paths are not published
    return text


def test_push_to_hub_uploads_the_folder_with_a_card_huggingface_hub_reads(run, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path)
    model = FlameModel.from_pretrained(run)
    url = model.push_to_hub("me/tiny", private=True, revision="v1", commit_message="first", evals=_eval_files(tmp_path))
    assert url.startswith("https://huggingface.co/me/tiny/commit/")
    assert hub.names() == ["create_repo", "create_branch", "upload_folder"]
    (_, repo), (_, branch), (_, upload) = hub.calls
    assert repo["repo_id"] == "me/tiny" and repo["private"] is True and repo["exist_ok"] is True
    assert branch["branch"] == "v1" and upload["revision"] == "v1" and upload["commit_message"] == "first"
    assert sorted(hub.uploaded) == ["README.md", "config.json", "model.safetensors"]
    _check_card(hub.folder / "README.md", model)
    assert torch.equal(_vectors(hub.folder), _vectors(model))


def test_flame_push_dry_run_writes_the_folder_and_uploads_nothing(run, tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path)
    evals = _eval_files(tmp_path)
    r = run_flame(capsys, "push", run, "me/tiny", "--eval", evals[0], "--eval", evals[1], "--dry-run", tmp_path / "d")
    assert r.code == 0, r.err
    assert hub.calls == [] and "nothing uploaded" in r.out and "2 eval result(s)" in r.out
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    model = FlameModel.from_pretrained(run)
    assert _check_card(tmp_path / "d" / "README.md", model).count("from_pretrained(\"me/tiny\")") == 1
    r = run_flame(capsys, "push", run, "me/tiny", "--branch", "v2", "--eval", evals[0], "--eval", evals[1])
    assert r.code == 0, r.err
    assert hub.names() == ["create_repo", "create_branch", "upload_folder"] and hub.calls[1][1]["branch"] == "v2"
    assert hub.calls[0][1]["private"] is None  # an existing repo keeps its visibility
    assert (tmp_path / "d" / "README.md").read_bytes() == hub.uploaded["README.md"]


@pytest.mark.parametrize("repo", ["not a repo", "a/b/c", "name-only", "org/na--me"])
def test_flame_push_bad_repo_id_is_one_line_exit_2(run, tmp_path, capsys, monkeypatch, repo):
    hub = FakeHub(monkeypatch, tmp_path)
    r = run_flame(capsys, "push", run, repo, "--dry-run", tmp_path / "d")
    assert r.code == 2 and "is not a Hugging Face repo id" in r.error and repo in r.error
    assert hub.calls == [] and not (tmp_path / "d").exists()


def test_flame_push_bad_eval_file_is_one_line_exit_2(run, tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path)
    (tmp_path / "bad.json").write_text(json.dumps({"dataset": "x", "metrics": {}}))
    r = run_flame(capsys, "push", run, "me/tiny", "--eval", tmp_path / "bad.json")
    assert r.code == 2 and "is not a flame eval result" in r.error and hub.calls == []


def test_a_model_without_a_run_record_or_results_gets_a_card_that_says_so(tmp_path, models):
    model = FlameModel.from_pretrained(models[0])
    text = model.model_card(repo_id="me/tiny")
    assert "No training record" in text and "No `flame eval` results" in text and "model-index" not in text


def test_flame_eval_reads_the_text_side_of_a_repo_from_the_cache(offline, hub_cache, models, monkeypatch):
    from flame.evaluate.cli import text_side_of

    monkeypatch.setattr(offline, "HF_HUB_CACHE", str(hub_cache))
    assert text_side_of(REPO, None) == FlameModel.read_config(models[1])["text"]


def test_flame_push_refuses_results_of_another_model(run, tmp_path, capsys, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path)
    other = run / "checkpoint-2"  # the same run's older weights
    (tmp_path / "other.json").write_text(json.dumps(
        {"dataset": "x", "model": str(other), "task": "linear_probe", "metrics": {"lp_acc1": 0.5}}))
    r = run_flame(capsys, "push", run, "me/tiny", "--eval", tmp_path / "other.json")
    assert r.code == 2 and "its results are of" in r.error and "checkpoint-2" in r.error and hub.calls == []
    same = shutil.copytree(run / "checkpoint-4", tmp_path / "copy")  # the same weights elsewhere
    (tmp_path / "same.json").write_text(json.dumps(
        {"dataset": "x", "model": str(same), "task": "linear_probe", "metrics": {"lp_acc1": 0.5}}))
    assert run_flame(capsys, "push", run, "me/tiny", "--eval", tmp_path / "same.json").code == 0
    assert "| x | linear_probe |  | lp_acc1 | 0.5000 |" in hub.uploaded["README.md"].decode()
