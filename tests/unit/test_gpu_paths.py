"""GPU-path defects the CPU can show (issue 15): the device of each rank, bf16 only where native,
cuBLAS's deterministic workspace, and CUDA generator states across visible-device counts.

CUDA itself is replaced by small fakes of the `torch.cuda` calls involved, each behaving as the
real one does on such a machine (a GPU index past the visible count raises IndexError, as
`torch.cuda` does)."""

from __future__ import annotations

import os

import pytest
import torch

from flame import distributed
from flame.errors import FlameError
from flame.train import state as train_state
from flame.train.config import TrainConfig
from flame.train.plan import use_bf16


def _torchrun(monkeypatch, world: int, local: int = 1) -> None:
    for k, v in {"RANK": local, "LOCAL_RANK": local, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x"}.items():
        monkeypatch.setenv(k, str(v))


@pytest.mark.parametrize("device", ["cuda:0", "cuda:3"])
def test_an_explicit_gpu_under_torchrun_is_refused_not_shared_by_every_rank(monkeypatch, device):
    _torchrun(monkeypatch, world=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(FlameError, match="every rank on one GPU.*--device cuda"):
        distributed.resolve_device(device)
    assert distributed.resolve_device("cuda") == torch.device("cuda:1")  # this rank's own (LOCAL_RANK 1)


def test_an_explicit_gpu_alone_is_kept(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.resolve_device("cuda:2") == torch.device("cuda:2")


@pytest.mark.parametrize("native", [True, False])
def test_bf16_is_chosen_only_on_a_gpu_that_has_it(monkeypatch, native):
    calls = []

    def supported(including_emulation=True):
        calls.append(including_emulation)
        return native or including_emulation  # torch's answer with emulation counted is True on a V100

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla V100-SXM2-16GB")
    gpu = torch.device("cuda:0")
    assert use_bf16(TrainConfig(precision="auto"), gpu) is native
    assert calls and not any(calls)  # asked without emulation
    if native:
        assert use_bf16(TrainConfig(precision="bf16"), gpu)
    else:
        with pytest.raises(FlameError, match="V100.*no native bf16"):
            use_bf16(TrainConfig(precision="bf16"), gpu)
    assert use_bf16(TrainConfig(precision="bf16"), torch.device("cpu"))  # the CPU: measured by the user
    assert not use_bf16(TrainConfig(precision="auto"), torch.device("cpu"))


def test_deterministic_sets_the_cublas_workspace_before_any_matmul(monkeypatch):
    from flame.train.loop import deterministic

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] in (":4096:8", ":16:8")
        assert torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # the user's own value is kept
    finally:
        torch.use_deterministic_algorithms(False)


class FakeCuda:
    """The generator calls of `torch.cuda` on a process that sees `visible` GPUs, current `current`."""

    def __init__(self, visible: int, current: int = 0):
        self.visible, self.current = visible, current
        self.states = {i: torch.tensor([i], dtype=torch.uint8) for i in range(visible)}

    def _index(self, device) -> int:
        if isinstance(device, int):
            i = device
        else:
            i = torch.device(device).index
            i = self.current if i is None else i
        if i >= self.visible:
            raise IndexError("list index out of range")
        return i

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: self.visible)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)])
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [self.states[i] for i in range(self.visible)])

        def set_state(new, device="cuda"):
            self.states[self._index(device)] = new

        def set_all(new):
            for i, s in enumerate(new):
                set_state(s, i)

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)


def test_a_checkpoint_saved_seeing_8_gpus_resumes_with_one_gpu_per_process(monkeypatch):
    saving = FakeCuda(visible=8, current=3)
    saving.install(monkeypatch)
    # what a checkpoint written by the older code, with all 8 GPUs visible, holds for LOCAL_RANK 3
    old_style = {**train_state.rng_state(), "cuda": [torch.tensor([10 + i], dtype=torch.uint8) for i in range(8)]}
    new_style = train_state.rng_state()
    assert torch.equal(new_style["cuda"], saving.states[3])  # only this process's own GPU is saved

    resuming = FakeCuda(visible=1, current=0)  # CUDA_VISIBLE_DEVICES=3 for LOCAL_RANK 3
    resuming.install(monkeypatch)
    monkeypatch.setenv("LOCAL_RANK", "3")
    train_state.set_rng_state(old_style)
    assert resuming.states[0].item() == 13  # the generator of the GPU this rank used
    train_state.set_rng_state(new_style)
    assert torch.equal(resuming.states[0], saving.states[3])
