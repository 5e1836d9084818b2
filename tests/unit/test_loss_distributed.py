"""2-process torchrun (gloo, CPU): loss and gradients equal one process on the concatenated batch."""

from __future__ import annotations

import os
import subprocess
import textwrap

import pytest
import torch
from support.commands import TORCHRUN_2

WORKER = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    from flame import distributed
    from flame.loss import MultiPositiveSigmoidLoss, INIT_LOGIT_SCALE, INIT_LOGIT_BIAS

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 8, dtype=torch.float64)
            self.t = torch.nn.Parameter(torch.tensor(INIT_LOGIT_SCALE + 0.7, dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.tensor(INIT_LOGIT_BIAS + 6.0, dtype=torch.float64))
        def forward(self, x):
            return F.normalize(self.lin(x), dim=-1), self.t, self.b

    out = sys.argv[1]
    device = distributed.init("cpu")
    r, w = distributed.rank(), distributed.world_size()
    assert w == 2, w
    B, m = 3, 4
    g = torch.Generator().manual_seed(0)
    x = torch.randn(w * B, 12, generator=g, dtype=torch.float64)
    txt = F.normalize(torch.randn(w * B, m, 8, generator=g, dtype=torch.float64), dim=-1)
    torch.manual_seed(1)
    model = Tiny()
    ddp = distributed.wrap_ddp(model, device)
    img, t, b = ddp(x[r * B:(r + 1) * B])
    loss = MultiPositiveSigmoidLoss()(img, txt[r * B:(r + 1) * B], t, b)
    loss.backward()
    global_loss = distributed.all_reduce_mean(loss)
    if r == 0:
        torch.save({"loss": global_loss, "grads": {n: p.grad for n, p in model.named_parameters()},
                    "x": x, "txt": txt, "state": {k: v for k, v in model.state_dict().items()}}, out)
    distributed.leave_together()
    distributed.shutdown()
    """
)


@pytest.mark.slow
def test_two_process_loss_and_grads_equal_single_process(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [*TORCHRUN_2, str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out, weights_only=False)

    import torch.nn.functional as F

    from flame.loss import MultiPositiveSigmoidLoss

    lin = torch.nn.Linear(12, 8, dtype=torch.float64)
    lin.weight.data.copy_(res["state"]["lin.weight"])
    lin.bias.data.copy_(res["state"]["lin.bias"])
    t = torch.nn.Parameter(res["state"]["t"].clone())
    b = torch.nn.Parameter(res["state"]["b"].clone())
    img = F.normalize(lin(res["x"]), dim=-1)
    loss = MultiPositiveSigmoidLoss(gather_texts=False)(img, res["txt"], t, b)
    loss.backward()
    assert torch.allclose(res["loss"], loss, atol=1e-5, rtol=0)
    assert abs(res["loss"].item() - loss.item()) < 1e-10  # float64: far tighter than the 1e-5 asked
    ref = {"lin.weight": lin.weight.grad, "lin.bias": lin.bias.grad, "t": t.grad, "b": b.grad}
    for name, grad in ref.items():
        assert torch.allclose(res["grads"][name], grad, atol=1e-5, rtol=0), name
        assert (res["grads"][name] - grad).abs().max() < 1e-10, name
