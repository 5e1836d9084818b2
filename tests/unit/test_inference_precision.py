"""Evaluation and search on a GPU (issue 15, item 12): the tower runs in bf16 autocast (or TF32
where the GPU has no native bf16), recorded as the result's `precision`; the CPU stays fp32 with
results exactly as before; the L-BFGS linear probe runs on the GPU when there is one.

CUDA-only choices are shown with fakes of the `torch.cuda` calls involved (as in test_gpu_paths)."""

from __future__ import annotations

import torch

from flame.evaluate import metrics as M
from flame.model import FlameModel, inference_precision, tower_precision
from flame.vision import TowerConfig


def _tiny_model() -> FlameModel:
    torch.manual_seed(0)
    return FlameModel(TowerConfig("vit-tiny", embed_dim=16, proj_hidden=16, image_size=32), {}).eval()


def test_the_cpu_stays_fp32_with_identical_vectors_and_the_global_setting_untouched():
    model = _tiny_model()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    before = torch.get_float32_matmul_precision()
    with torch.no_grad():
        plain = model.visual(x).float()  # what encode_image ran before (no autocast, no TF32)
    assert model.precision == "fp32"
    assert torch.equal(model.encode_image(x), plain)
    assert torch.get_float32_matmul_precision() == before


def test_cuda_uses_bf16_where_native_else_tf32(monkeypatch):
    for native, want in ((True, "bf16"), (False, "tf32")):
        asked = []

        def supported(including_emulation=True, native=native, asked=asked):
            asked.append(including_emulation)
            return native or including_emulation  # a V100 answers True when emulation counts

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
        assert inference_precision(torch.device("cuda:1")) == want
        assert asked == [False]
    assert inference_precision("cpu") == "fp32"


def test_tf32_is_set_inside_the_block_and_restored_after(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    before = torch.get_float32_matmul_precision()
    with tower_precision("cuda:0") as kind:
        assert kind == "tf32"
        assert torch.get_float32_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == before


def test_the_lbfgs_probe_goes_to_the_gpu_when_there_is_one(monkeypatch):
    assert M.compute_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert M.compute_device(None) == torch.device("cuda")
    assert M.compute_device(torch.device("cpu")) == torch.device("cpu")  # an explicit choice is kept


def test_evaluate_hands_the_probe_the_models_device_and_records_the_precision(tmp_path, monkeypatch):
    from flame.evaluate import load_dataset, tasks
    from tests.support.evalsets import class_folder

    seen = {}
    real = M.linear_probe

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(M, "linear_probe", spy)
    ds = load_dataset(str(class_folder(tmp_path / "set", per_class=4)))
    model = _tiny_model()
    result = tasks.evaluate(model, ds, "linear_probe", workers=0, cache_dir=False, progress=False,
                            probe={"method": "lbfgs"}, text="no text side: a probe reads none")
    assert seen["device"] == model.device
    assert result["precision"] == "fp32"


def test_the_lbfgs_probe_on_the_cpu_is_unchanged_by_the_device_argument():
    g = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(60, 8, generator=g), torch.randn(30, 8, generator=g)
    ytr, yte = torch.arange(60) % 6, torch.arange(30) % 6  # 6 classes: acc5 is a number, not NaN
    xtr[:, 0] += ytr * 2.0
    xte[:, 0] += yte * 2.0
    on_cpu = M.linear_probe(xtr, ytr, xte, yte, max_iter=20, device="cpu")
    assert on_cpu == M.linear_probe(xtr, ytr, xte, yte, max_iter=20)
