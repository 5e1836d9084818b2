"""`--probe clip-benchmark` (issue 16 item 4, issue 18 item 12): the same accuracy and the same
weight decay as the clip-benchmark package's own `linear_probe.evaluate` on the same features."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flame.evaluate.probe import clip_benchmark_probe

CUDA = torch.cuda.is_available()


def features(seed: int, n_train: int, n_val: int, n_test: int, dim: int = 24, classes: int = 7):
    """Gaussian classes, overlapping enough that accuracy is neither chance nor perfect; L2-normalised
    (what CLIP_benchmark caches)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)

    def split(n):
        y = torch.randint(0, classes, (n,), generator=g)
        return F.normalize(centers[y] + 1.6 * torch.randn(n, dim, generator=g), dim=-1), y

    return split(n_train), split(n_val), split(n_test)


def package_probe(tmp_path, monkeypatch, train, test, val=None, seed=0, epochs=3, batch_size=64, lr=0.1):
    """clip_benchmark.metrics.linear_probe.evaluate itself, on features already in its cache
    (so no model is needed), seeded as its cli seeds a run. It insists on CUDA; without one, its
    `.cuda()` and `.to("cuda")` calls are made no-ops so the very same code runs on the CPU."""
    from clip_benchmark.metrics import linear_probe as lp
    from clip_benchmark.metrics import zeroshot_classification as zc

    # its `accuracy` calls float() on a 1-element array, which NumPy 2 refuses: a module-level
    # `float` there takes the element, as NumPy 1 did
    monkeypatch.setattr(zc, "float", lambda x: builtins.float(np.asarray(x).reshape(-1)[0]), raising=False)

    folder = tmp_path / "features" / "model"
    folder.mkdir(parents=True)
    splits = {"train": train, "test": test} | ({"val": val} if val is not None else {})
    for name, (x, y) in splits.items():
        torch.save(x, folder / f"features_{name}.pt")
        torch.save(y, folder / f"targets_{name}.pt")
    if not CUDA:
        monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *a, **k: self)
        to = torch.Tensor.to
        monkeypatch.setattr(torch.Tensor, "to",
                            lambda self, *a, **k: to(self, *("cpu" if x == "cuda" else x for x in a), **k))
    torch.manual_seed(seed)
    return lp.evaluate(None, None, None, fewshot_k=-1, batch_size=batch_size, num_workers=0, lr=lr, epochs=epochs,
                       model_id="model", seed=seed, feature_root=str(tmp_path / "features"), device="cuda",
                       val_dataloader=object() if val is not None else None, normalize=True, amp=CUDA)


def test_same_accuracy_as_the_package_without_a_validation_split(tmp_path, monkeypatch):
    train, _, test = features(0, 700, 0, 300)
    ref = package_probe(tmp_path, monkeypatch, train, test)
    monkeypatch.undo()
    ours = clip_benchmark_probe(*train, *test, epochs=3, batch_size=64, normalize=False)
    assert 0.3 < ref["lp_acc1"] < 0.95  # a real problem, not a saturated one
    assert ours["weight_decay"] == ref["weight_decay"] == 0
    assert abs(ours["lp_acc1"] - ref["lp_acc1"]) <= 0.005
    assert abs(ours["lp_acc5"] - ref["lp_acc5"]) <= 0.005
    assert abs(ours["lp_mean_per_class_recall"] - ref["lp_mean_per_class_recall"]) <= 0.005
    # re-normalising the (normalised) features per batch, as the streamed probe does by default
    again = clip_benchmark_probe(*train, *test, epochs=3, batch_size=64)
    assert abs(again["lp_acc1"] - ref["lp_acc1"]) <= 0.005


@pytest.mark.slow
def test_same_weight_decay_and_accuracy_as_the_package_with_a_validation_split(tmp_path, monkeypatch):
    train, val, test = features(1, 300, 150, 200, classes=5)
    ref = package_probe(tmp_path, monkeypatch, train, test, val=val, epochs=2, batch_size=128)
    monkeypatch.undo()
    ours = clip_benchmark_probe(*train, *test, *val, epochs=2, batch_size=128, normalize=False)
    assert ours["weight_decay"] == ref["weight_decay"]
    assert ours["weight_decay"] > 0  # the search ran
    assert abs(ours["lp_acc1"] - ref["lp_acc1"]) <= 0.005
    assert np.isnan(ours["lp_acc5"]) == np.isnan(ref["lp_acc5"])


def test_memory_maps_give_the_same_probe_as_tensors(tmp_path):
    train, _, test = features(2, 400, 0, 100)
    np.save(tmp_path / "train.npy", train[0].numpy())
    np.save(tmp_path / "test.npy", test[0].numpy())
    maps = (np.load(tmp_path / "train.npy", mmap_mode="r"), np.load(tmp_path / "test.npy", mmap_mode="r"))
    a = clip_benchmark_probe(train[0], train[1], test[0], test[1], epochs=2, batch_size=64)
    b = clip_benchmark_probe(maps[0], train[1], maps[1], test[1], epochs=2, batch_size=64)
    assert a == b
