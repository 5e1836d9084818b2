"""flame train: validation before training, data pipeline, resume after SIGKILL, learning."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from support.commands import TORCHRUN_2
from support.training import TINY, bag_of_words_store, heldout_r1

from flame.cli import main as flame_main


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    from flame.data.synthetic import write_shards

    root = tmp_path_factory.mktemp("shapes")
    shards = write_shards(root / "shards", 96, shard_size=32, size=40, seed=0)
    bag_of_words_store(shards, root / "store", dim=16, k=3)
    return root


def _run(argv, capsys):
    code = flame_main(["train", *argv])
    err = capsys.readouterr().err.strip()
    return code, err


def _base(root, out, *extra):
    return ["--data", str(root / "shards"), "--embeddings", str(root / "store"), "--out", str(out), *TINY,
            "--batch-size", "8", "--workers", "0", *extra]


# ---------------------------------------------------------------------------------------
# bad input: exit 2, one line, no traceback, nothing trained
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "case,expect",
    [
        ("dim", "D=16 but the model config asks for D=32"),
        ("k", "K=3 facets but the model config asks for K=7"),
        ("tower", "unknown tower 'vit-huge-99'"),
        ("missing_shard", "does not exist"),
        ("no_overlap", "no overlap between"),
        ("key_overlap", "no overlap between shard keys and store keys"),
        ("positives", "--positives 5"),
        ("facets", "prompt set 'short' is not in the store"),
        ("logit_scale", "--init-logit-scale must be a number in [1, 100] or auto"),
    ],
)
def test_bad_input_one_line_before_training(case, expect, small_set, tmp_path, capsys):
    out = tmp_path / "run"
    argv = _base(small_set, out, "--steps", "2")
    if case == "dim":
        argv += ["--embed-dim", "32"]
    elif case == "k":
        argv += ["--k", "7"]
    elif case == "tower":
        argv[argv.index("vit-tiny")] = "vit-huge-99"
    elif case == "missing_shard":
        argv[1] = str(small_set / "shards" / "shapes-{00000..00003}.tar")  # 00003 does not exist
    elif case == "no_overlap":
        from flame.data.synthetic import write_shards

        argv[1] = str(write_shards(tmp_path / "other", 8, shard_size=8, size=40, prefix="other")[0])
    elif case == "key_overlap":
        from flame.data.synthetic import write_shards

        # same shard name as the store's, but different keys (another seed)
        argv[1] = str(write_shards(tmp_path / "same-name", 8, shard_size=8, size=40, seed=7)[0])
    elif case == "positives":
        argv += ["--positives", "5"]
    elif case == "facets":
        argv += ["--facets", "short"]
    elif case == "logit_scale":
        argv += ["--init-logit-scale", "500"]
    code, err = _run(argv, capsys)
    assert code == 2
    assert expect in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (out / "log.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_init_logit_scale_auto_follows_the_stores_spread(small_set, tmp_path, capsys):
    """"auto" starts t at 10 / sqrt(1 - mean pairwise cosine) of the stored vectors; a number is used as
    given. A learning rate of ~0 leaves t where it started, so the checkpoint shows it."""
    from safetensors.torch import load_file

    from flame.store import EmbeddingStore

    store = EmbeddingStore(small_set / "store")
    vecs = np.concatenate([store.get(n, slice(None)) for n in store.shards]).reshape(-1, store.dim)
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    cos = vecs @ vecs.T
    mean = (cos.sum() - len(vecs)) / (len(vecs) ** 2 - len(vecs))  # every vector: the sample is the whole store
    expect = 10 / np.sqrt(1 - mean)
    assert expect > 11  # the bag-of-words store is anisotropic enough for the test to mean something

    def t_of(run):
        state = load_file(str(run / "checkpoint-1" / "model.safetensors"))
        return float(np.exp(state["logit_scale"].item()))

    for spec, want in (("auto", expect), ("25", 25.0), (None, 10.0)):
        out = tmp_path / f"run-{spec}"
        extra = ["--steps", "1", "--lr", "1e-12", "--warmup", "0", "--save-every", "1"]
        code, err = _run(_base(small_set, out, *extra, *(["--init-logit-scale", spec] if spec else [])), capsys)
        assert code == 0, err
        assert t_of(out) == pytest.approx(want, rel=1e-3), spec


@pytest.mark.slow
def test_bad_input_cli_subprocess_has_no_traceback(small_set, tmp_path):
    argv = _base(small_set, tmp_path / "run", "--steps", "2", "--embed-dim", "99")
    proc = subprocess.run([sys.executable, "-m", "flame", "train", *argv], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "D=16" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_train_writes_checkpoints_logs_and_resume_checks_config(small_set, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 4\nsave_every: 2\nlog_every: 2\nlr: 0.001\nwarmup: 1\nfacets: '0,2'\npositives: 2\n")
    code, err = _run(_base(small_set, out, "--config", str(cfg)), capsys)
    assert code == 0, err
    assert (out / "latest").read_text().strip() == "checkpoint-4"
    ckpt = out / "checkpoint-4"
    conf = json.loads((ckpt / "config.json").read_text())
    assert conf["tower"]["embed_dim"] == 16 and conf["text"]["k"] == 3 and conf["text"]["llm"]["fingerprint"] == "bow"
    state = torch.load(ckpt / "state.pt", weights_only=False)
    assert state["step"] == 4 and state["optimizer"]["state"] and state["positions"][0]
    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and all(np.isfinite(r["loss"]) for r in records)
    assert not list(out.glob(".checkpoint-*"))
    # the model in the checkpoint loads and encodes
    from flame.model import FlameModel

    model = FlameModel.load(ckpt)
    assert model.encode_image(torch.zeros(2, 3, 32, 32)).shape == (2, 16)
    # weight decay groups: matrices decay, norms / biases / logit params do not
    from flame.train import param_groups

    groups = param_groups(model, 0.5)
    ids = {id(p) for p in groups[1]["params"]}
    assert id(model.logit_scale) in ids and id(model.logit_bias) in ids
    assert id(model.visual.projector[3].weight) in ids and id(model.visual.projector[0].bias) in ids
    assert id(model.visual.projector[0].weight) not in ids

    # same out without --resume: refused
    code, err = _run(_base(small_set, out, "--config", str(cfg)), capsys)
    assert code == 2 and "--resume" in err
    # resume with a different config: refused unless --force
    code, err = _run(_base(small_set, out, "--config", str(cfg), "--lr", "0.01", "--resume"), capsys)
    assert code == 2 and "lr" in err and "--force" in err and len(err.splitlines()) == 1
    code, err = _run(_base(small_set, out, "--config", str(cfg), "--steps", "6", "--lr", "0.01", "--resume",
                           "--force"), capsys)
    assert code == 0, err
    assert (out / "latest").read_text().strip() == "checkpoint-6"


def test_stream_skips_and_counts_missing_and_undecodable(tmp_path):
    import webdataset as wds

    from flame.data.images import StreamConfig, make_loader
    from flame.data.synthetic import write_shards

    shards = write_shards(tmp_path / "s", 20, shard_size=20, size=40)
    store = bag_of_words_store(shards, tmp_path / "store", dim=8)
    # rewrite the shard: 3 extra samples without embeddings, 2 with corrupt images
    good = list(wds.tarfile_samples([{"url": str(shards[0])}]))
    with wds.TarWriter(str(shards[0])) as sink:
        for i in range(3):
            sink.write({"__key__": f"nokey{i}", "jpg": good[0]["jpg"], "txt": b"x"})
        for i, s in enumerate(good):
            sample = {"__key__": s["__key__"], "jpg": s["jpg"], "txt": s["txt"]}
            if i in (4, 9):
                sample["jpg"] = b"not a jpeg"
            sink.write(sample)
    cfg = StreamConfig(shards=[str(shards[0])], store=str(store.path), image_size=32, batch_size=5, m=1,
                       eligible=[0])
    it = iter(make_loader(cfg, 0))
    batches = [next(it) for _ in range(3)]  # 15 usable samples per epoch -> 3 batches
    st = batches[-1]["state"]
    assert (st["missing"], st["undecodable"], st["samples"]) == (3, 2, 15)
    assert batches[0]["images"].dtype == torch.uint8 and batches[0]["images"].shape == (5, 3, 32, 32)
    assert batches[0]["texts"].shape == (5, 1, 8)


def test_stream_split_covers_each_sample_once_per_epoch(small_set):
    """Ranks x workers partition an epoch (shard-level split and the sample-level fallback)."""
    from flame.data.images import StreamConfig, TrainStream

    shards = sorted(str(p) for p in (small_set / "shards").glob("*.tar"))  # 3 shards x 32
    for world, workers in ((1, 3), (2, 2)):  # G = 3 (shard split), G = 4 > 3 shards (sample split)
        seen = []
        for rank in range(world):
            for w in range(workers):
                cfg = StreamConfig(shards=shards, store=str(small_set / "store"), image_size=16, batch_size=1,
                                   m=1, eligible=[0], rank=rank, world=world)
                stream = TrainStream(cfg)
                stream._worker = lambda w=w, n=workers: (w, n)
                for b in stream:
                    if b["state"]["epoch"] > 0:
                        break
                    seen.extend(b["keys"])
                    if len(seen) > 200:
                        break
        assert len(seen) == 96 and len(set(seen)) == 96, (world, workers, len(seen), len(set(seen)))


def test_facet_eligibility():
    from flame.data.images import eligible_facets
    from flame.errors import FlameError

    man = {"k": 11, "facets": ["raw/0"] + [f"short/{i}" for i in range(3)] + [f"long/{i}" for i in range(7)]}
    assert eligible_facets("all", man) == list(range(11))
    assert eligible_facets("long", man) == list(range(4, 11))
    assert eligible_facets("raw,short", man) == [0, 1, 2, 3]
    assert eligible_facets("0,2-4", man) == [0, 2, 3, 4]
    with pytest.raises(FlameError):
        eligible_facets("11", man)


@pytest.mark.slow
def test_training_never_imports_the_llm_stack(small_set, tmp_path, capsys):
    code = subprocess.run(
        [sys.executable, "-c",
         "import sys; from flame.cli import main; rc = main(sys.argv[1:]); "
         "assert not {'flame.llm', 'flame.facets'} & set(sys.modules), 'LLM code imported'; raise SystemExit(rc)",
         "train", *_base(small_set, tmp_path / "run", "--steps", "1")],
        capture_output=True, text=True, timeout=120,
    )
    assert code.returncode == 0, code.stderr[-2000:]


# ---------------------------------------------------------------------------------------
# resume after SIGKILL == uninterrupted (real path: flame embed with the tiny LLM)
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded_set(tmp_path_factory, tiny_llm_dir):
    from flame.data.synthetic import write_shards

    root = tmp_path_factory.mktemp("embedded")
    write_shards(root / "shards", 64, shard_size=16, size=40, seed=3)
    code = flame_main(["embed", "--data", str(root / "shards"), "--prompts", "raw=txt", "--llm", str(tiny_llm_dir),
                       "--out", str(root / "store")])
    assert code == 0
    return root


def _train_cmd(root, out, *extra):
    return [sys.executable, "-m", "flame", "train", "--data", str(root / "shards"), "--embeddings",
            str(root / "store"), "--out", str(out), *TINY, "--batch-size", "8", "--workers", "2", "--steps", "16",
            "--save-every", "4", "--keep", "0", "--warmup", "2", "--deterministic", "--seed", "5", *extra]


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(embedded_set, tmp_path):
    from safetensors.torch import load_file

    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref = subprocess.run(_train_cmd(embedded_set, tmp_path / "ref"), env=env, capture_output=True, text=True,
                         timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(embedded_set, out), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoint-4" / "state.pt").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-16").exists(), "killed too late to test anything"

    res = subprocess.run(_train_cmd(embedded_set, out, "--resume"), env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr + res.stdout
    a = load_file(str(tmp_path / "ref" / "checkpoint-16" / "model.safetensors"))
    b = load_file(str(out / "checkpoint-16" / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-6, worst
    # and the run did learn something different from its start (a real comparison)
    first = load_file(str(tmp_path / "ref" / "checkpoint-4" / "model.safetensors"))
    assert max((a[k] - first[k]).abs().max().item() for k in a) > 1e-4


# ---------------------------------------------------------------------------------------
# learning: held-out images of seen caption combinations are retrieved far above chance
# ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_learning_heldout_image_to_text_r1(tmp_path, capsys):
    """120 colour x shape x position captions; held-out images of them must retrieve their own
    caption far more often than chance (measured ~0.57 R@1 vs 0.0097 chance at these settings)."""
    from flame.data.synthetic import combos, write_shards

    pool = combos()
    train = write_shards(tmp_path / "train", 1024, shard_size=256, size=32, seed=1, pool=pool)
    held = write_shards(tmp_path / "held", 256, shard_size=256, size=32, seed=2, prefix="heldout", pool=pool)
    bag_of_words_store(train + held, tmp_path / "store", dim=32)
    out = tmp_path / "run"
    code, err = _run(["--data", str(tmp_path / "train"), "--embeddings", str(tmp_path / "store"), "--out", str(out),
                      "--tower", "vit-tiny", "--image-size", "32", "--proj-hidden", "64", "--no-progress",
                      "--no-tensorboard", "--batch-size", "64", "--steps", "400", "--warmup", "10", "--lr", "1e-3",
                      "--weight-decay", "0.0", "--workers", "1", "--save-every", "400"], capsys)
    assert code == 0, err
    r1, n = heldout_r1(out / "checkpoint-400", tmp_path / "store", held[0])
    chance = 1 / n
    print(f"held-out R@1 {r1:.3f} over {n} captions (chance {chance:.4f})")
    assert n >= 100
    assert r1 >= 20 * chance, (r1, chance)


@pytest.mark.slow
def test_torchrun_two_processes_train_and_resume(small_set, tmp_path):
    """The real multi-process path (torchrun, gloo, DDP, text all-gather, per-rank data
    positions): resuming from the step-2 checkpoint under torchrun reproduces step 4 exactly."""
    from safetensors.torch import load_file

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*extra):
        cmd = [*TORCHRUN_2, "-m", "flame", "train",
               *_base(small_set, out, "--steps", "4", "--log-every", "2", "--save-every", "2", "--keep", "0",
                      "--warmup", "1", "--deterministic", *extra)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    proc = torchrun()
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(ln) for ln in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 4 and records[-1]["samples"] == 2 * 8 * 4  # both ranks' samples, counted once
    state = torch.load(out / "checkpoint-4" / "state.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["positions"]) == 2 and len(state["rng"]) == 2
    first = load_file(out / "checkpoint-4" / "model.safetensors")

    proc = torchrun("--resume", str(out / "checkpoint-2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "at step 2" in proc.stderr and "step 2/4" not in proc.stdout + proc.stderr  # steps 3-4 only
    again = load_file(out / "checkpoint-4" / "model.safetensors")
    assert max((first[k] - again[k]).abs().max().item() for k in first) <= 1e-6
    assert [r["step"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())] == [2, 4]

    proc = torchrun("--resume", "--lr", "0.01")  # a changed setting: one line from rank 0 only
    assert proc.returncode != 0
    assert proc.stderr.count("flame train: error: --resume: settings differ") == 1


# ---------------------------------------------------------------------------------------
# settings: declared once in TrainConfig, --config YAML checked like the flags
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("yaml,expect", [("lr: abc\n", "--lr (lr): expected a finite number"),
                                         ("batch_size: 0\n", "--batch-size must be >= 1 (got 0)")])
def test_config_file_with_a_wrong_value_is_one_line_exit_2(yaml, expect, tmp_path, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml)
    code = flame_main(["train", "--config", str(cfg), "--data", str(tmp_path), "--embeddings", str(tmp_path),
                       "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_help_shows_the_defaults_of_the_dataclass(capsys):
    with pytest.raises(SystemExit):
        flame_main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("(default 384)", "(default max(D, 4096))", "(default 32 if no --steps)", "(default min(6, K))",
                  "--no-progress", "--no-tensorboard", "--pool-first [BOOL]", "--resume [CHECKPOINT]",
                  "--crop-scale LO HI", "--betas B1 B2", "-m POSITIVES", "--config FILE"):
        assert shown in text, shown


def test_model_folder_and_resume_agree_on_the_latest_checkpoint(tmp_path):
    """One rule (flame.runfolder): `latest`, then the ledger's write order, then the highest step."""
    from flame.model import resolve_model_folder
    from flame.runfolder import LEDGER, latest_checkpoint

    run = tmp_path / "run"
    for step in (2, 4, 6):
        ckpt = run / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        for name in ("model.safetensors", "config.json", "state.pt"):
            (ckpt / name).write_text("x")
    (run / LEDGER).write_text(json.dumps({"written": ["checkpoint-6", "checkpoint-2", "checkpoint-4"]}))
    assert latest_checkpoint(run).name == resolve_model_folder(run).name == "checkpoint-4"  # write order
    (run / "latest").write_text("checkpoint-2\n")
    assert latest_checkpoint(run).name == resolve_model_folder(run).name == "checkpoint-2"
    (run / "latest").unlink()
    (run / LEDGER).unlink()
    assert latest_checkpoint(run).name == resolve_model_folder(run).name == "checkpoint-6"
    (run / "checkpoint-6" / "state.pt").unlink()  # still a model, no longer resumable
    assert resolve_model_folder(run).name == "checkpoint-6" and latest_checkpoint(run).name == "checkpoint-4"


def test_clip_baseline_runs_on_the_train_loop(small_set, tmp_path):
    """The demo's CLIP baseline: its recipe is a TrainConfig (no setting declared twice), it trains
    through flame.train's Trainer, and done.json keeps the keys it always had."""
    from flame.baseline import BaselineConfig, ClipTextConfig, is_complete, load_baseline, train_baseline
    from flame.train import TrainConfig

    tower = {"tower": "vit-tiny", "embed_dim": 16, "proj_hidden": 32, "pool_first": False, "image_size": 32,
             "tower_kwargs": {}}
    cfg = BaselineConfig(shards=[str(p) for p in sorted((small_set / "shards").glob("*.tar"))],
                         store=str(small_set / "store"), out=str(tmp_path / "clip"), tower=tower, steps=3,
                         batch_size=8, lr=1e-3, warmup=1, weight_decay=0.5, seed=0, workers=0,
                         text=ClipTextConfig(width=32, heads=2, layers=1), data={"set": "small"})
    assert isinstance(cfg.recipe, TrainConfig) and cfg.recipe.steps == 3 and cfg.recipe.workers == 0
    assert set(cfg.to_dict()) == {"shards", "store", "out", "tower", "steps", "batch_size", "lr", "warmup", "min_lr",
                                  "weight_decay", "betas", "eps", "crop_scale", "seed", "log_every", "caption_ext",
                                  "text", "data"}
    records: list[dict] = []
    out = train_baseline(cfg, progress=False, on_log=records.append)
    assert [r["step"] for r in records] == [3] and np.isfinite(records[0]["loss"])
    assert is_complete(out, cfg) and not (out / "train-config.json").exists()
    image, text = load_baseline(out)
    assert image.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 16) and text.encode(["a"]).shape == (1, 16)
    with pytest.raises(Exception, match="--batch-size"):
        BaselineConfig(shards=cfg.shards, store=cfg.store, out=cfg.out, tower=tower, steps=3, batch_size=0)


def test_clip_baseline_tokenizes_each_caption_once_with_the_same_result(small_set, tmp_path, monkeypatch):
    """The captions are tokenized once before training; the run is bit-identical to tokenizing
    each batch's captions as it comes."""
    from safetensors.torch import load_file

    import flame.baseline as baseline
    from flame.baseline import BaselineConfig, ClipTextConfig, train_baseline
    from flame.data.images import normalize_images

    tower = {"tower": "vit-tiny", "embed_dim": 16, "proj_hidden": 32, "pool_first": False, "image_size": 32,
             "tower_kwargs": {}}

    def run(name):
        cfg = BaselineConfig(shards=[str(p) for p in sorted((small_set / "shards").glob("*.tar"))],
                             store=str(small_set / "store"), out=str(tmp_path / name), tower=tower, steps=4,
                             batch_size=8, lr=1e-3, warmup=1, seed=0, workers=0,
                             text=ClipTextConfig(width=32, heads=2, layers=1))
        return load_file(str(train_baseline(cfg, progress=False) / "text.safetensors"))

    calls = []
    real = baseline.ClipTextTower.tokenize
    monkeypatch.setattr(baseline.ClipTextTower, "tokenize", lambda self, t: calls.append(len(t)) or real(self, t))
    once = run("once")
    assert len(calls) == 1  # all captions, before the first step

    def per_batch(self, batch):  # the loss as it was: each batch's captions tokenized when it comes
        images = normalize_images(batch["images"].to(self.device), self.model.mean, self.model.std)
        tokens = self.text.tokenize([self.captions[k] for k in batch["keys"]]).to(self.device)
        return self.loss_fn(self.model.visual(images), self.text(tokens), self.text.logit_scale.exp())

    monkeypatch.setattr(baseline.ClipTrainer, "loss", per_batch)
    each = run("each")
    assert once.keys() == each.keys() and all(torch.equal(once[k], each[k]) for k in once)
