"""Issue 15 items 7 and 10: a training step reads nothing back from the device (the non-finite
guard decides on the device and a fused AdamW skips on it), agrees on data errors once per step
rather than once per micro-batch, overlaps the texts' all-gather with the forward, and the gloo
side channel for those agreements works."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from support.commands import TORCHRUN_2
from support.training import TINY, make_set

from flame.cli import main as flame_main
from flame.train.guard import NonFiniteGuard, step_unless
from flame.train.optim import adamw


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_set(tmp_path_factory.mktemp("syncs"), shards=2, per=16)


def argv(root, out, *extra):
    return ["train", "--data", str(root / "shards"), "--embeddings", str(root / "store"), "--out", str(out), *TINY,
            "--batch-size", "4", "--workers", "0", "--warmup", "1", *extra]


def test_a_training_step_reads_nothing_back_from_the_device(data, tmp_path, monkeypatch):
    """Every host read of a tensor's value (item, bool, int, float) inside `train_step` is a
    device sync on CUDA; the step must have none (logging and checkpoints have theirs)."""
    from flame.train.loop import Trainer

    reads: list[str] = []
    inside = [False]
    real_step = Trainer.train_step

    def step(self, data_):
        inside[0] = True
        try:
            return real_step(self, data_)
        finally:
            inside[0] = False

    def spy(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            if inside[0]:
                reads.append(name)
            return real(self, *a, **k)

        return read

    monkeypatch.setattr(Trainer, "train_step", step)
    for name in ("item", "__bool__", "__int__", "__float__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    code = flame_main(argv(data, tmp_path / "run", "--steps", "4", "--accum", "2", "--log-every", "4",
                           "--save-every", "4"))
    assert code == 0
    assert reads == []


def test_data_errors_are_agreed_once_per_step_not_per_micro_batch(data, tmp_path, monkeypatch):
    from flame import distributed

    calls = []
    real = distributed.check_errors
    monkeypatch.setattr(distributed, "check_errors", lambda e: (calls.append(e), real(e))[1])
    counts = []
    for accum in (1, 4):
        calls.clear()
        assert flame_main(argv(data, tmp_path / f"run{accum}", "--steps", "3", "--accum", str(accum))) == 0
        counts.append(len(calls))
    assert counts[0] == counts[1]  # 4 micro-batches a step cost no more agreements than 1


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_update_leaves_weights_and_optimizer_state_as_they_were(fused):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    if fused:
        opt = adamw([{"params": list(model.parameters())}], 0.1, (0.9, 0.98), 1e-6)
        assert opt.defaults["fused"]
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    guard = NonFiniteGuard(limit=2, device=torch.device("cpu"))

    def one_step(scale: float):
        loss = model(torch.ones(2, 4)).sum() * scale
        loss.backward()
        step_unless(opt, guard.flag(loss.detach(), model))
        opt.zero_grad(set_to_none=True)

    one_step(1.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    one_step(float("nan"))  # NaN loss and gradients: nothing moves
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    one_step(1.0)
    assert not torch.equal(model.weight, before["weight"])
    assert guard.logged() == 1 and guard.total == 1
    one_step(float("inf"))
    guard.settle(4, None)  # one in a row: under the limit
    one_step(float("nan"))
    with pytest.raises(Exception, match="2 consecutive steps"):
        guard.settle(5, None)


SIDE_CHANNEL = textwrap.dedent("""
    import torch, torch.distributed as td
    from flame import distributed
    from flame.errors import FlameError
    distributed.init("cpu", control=True)
    assert distributed._control is not None
    r = distributed.rank()
    try:
        distributed.check_errors("no usable sample here" if r == 1 else None)
    except distributed.AgreedError as e:
        print(f"rank {r} agreed: {e}", flush=True)
    assert distributed.first_error(None) is None
    def on_main():
        raise FlameError("refused by rank 0")
    try:
        distributed.decide(on_main)
    except distributed.AgreedError as e:
        print(f"rank {r} decided: {e}", flush=True)
    print(f"rank {r} sum {int(distributed.all_reduce_sum_int([r + 1], torch.device('cpu'))[0])}", flush=True)
    distributed.leave_together()
    distributed.shutdown()
""")


@pytest.mark.slow
def test_the_gloo_side_channel_carries_the_error_agreements(tmp_path):
    script = tmp_path / "side.py"
    script.write_text(SIDE_CHANNEL)
    p = subprocess.run([*TORCHRUN_2, str(script)], capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        assert f"rank {r} agreed: rank 1: no usable sample here" in p.stdout
        assert f"rank {r} decided: refused by rank 0" in p.stdout
        assert f"rank {r} sum 3" in p.stdout


OVERLAP = textwrap.dedent("""
    import json, sys, torch.distributed as td
    from pathlib import Path
    from flame import distributed
    from support.accumulation import make_trainer, one_step
    root, accum, out = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    distributed.init("cpu")
    trainer = make_trainer(root, f"run-{accum}", 2, accum)
    events = []
    real_gather, real_wait = td.all_gather, distributed.Gathering.wait
    def gather(parts, x, *a, async_op=False, **k):  # the texts' gather (float); not the agreements' objects
        if x.is_floating_point():
            events.append("gather async" if async_op else "gather")
        return real_gather(parts, x, *a, async_op=async_op, **k)
    def wait(self):
        events.append("wait")
        return real_wait(self)
    td.all_gather, distributed.Gathering.wait = gather, wait
    trainer.model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    one_step(trainer, iter(trainer.make_loader()))
    Path(f"{out}.{distributed.rank()}").write_text(json.dumps(events))
    distributed.leave_together()
    distributed.shutdown()
""")


@pytest.mark.slow
@pytest.mark.parametrize("accum", [1, 2])
def test_the_texts_all_gather_is_in_flight_during_the_forward(data, tmp_path, accum):
    """The stored texts are known before the step, so `decomposed` issues their all-gather (async)
    before the first forward and waits for it only after: the transfer overlaps the forward. That the
    step's result is unchanged is test_accumulation's two-process test."""
    script = tmp_path / "overlap.py"
    script.write_text(OVERLAP)
    tests = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), tests) if p))
    out = tmp_path / "events"
    p = subprocess.run([*TORCHRUN_2, str(script), str(data), str(accum), str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    for r in (0, 1):
        events = json.loads(Path(f"{out}.{r}").read_text())
        assert events == ["gather async", "forward", "wait"] + ["forward"] * (accum - 1)
