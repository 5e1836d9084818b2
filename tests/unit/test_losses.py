"""The four `flame train --loss` losses against brute-force references written out here (loops
over images, texts and positives) and, for siglip and clip, against open_clip's `SigLipLoss` /
`ClipLoss`; on one process and on two (torchrun, gloo: each rank's share, averaged as DDP
averages gradients, equals the loss of the concatenated batch, and so do the gradients)."""

from __future__ import annotations

import math
import os
import subprocess
import textwrap

import pytest
import torch
import torch.nn.functional as F
from support.commands import TORCHRUN_2

from flame.loss import LOSSES, ClipLoss, MultiPositiveSoftmaxLoss, SigLipLoss, make_loss

N, M, D = 5, 3, 8


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _ref_sigmoid(img, txt, t, b):
    """-sum over every (image i, image j, positive k) of log sigmoid(+-logit), over P * N."""
    n, p = txt.shape[:2]
    total = 0.0
    for i in range(n):
        for j in range(n):
            for k in range(p):
                logit = torch.exp(t) * (img[i] @ txt[j, k]) + b
                total = total + F.logsigmoid(logit if i == j else -logit)
    return -total / (p * n)


def _ref_softmax(img, txt, t):
    """The release's multi-positive NCE: image->text per positive slot (a softmax over the N texts
    of that slot), text->image per text (a softmax over the N images), each a mean over N * P."""
    n, p = txt.shape[:2]
    s = torch.exp(t)
    i2t = t2i = 0.0
    for i in range(n):
        for k in range(p):
            i2t = i2t - torch.log(torch.exp(s * img[i] @ txt[i, k]) / sum(torch.exp(s * img[i] @ txt[j, k])
                                                                          for j in range(n)))
            t2i = t2i - torch.log(torch.exp(s * txt[i, k] @ img[i]) / sum(torch.exp(s * txt[i, k] @ img[j])
                                                                          for j in range(n)))
    return (i2t + t2i) / (2 * n * p)


REFERENCES = {
    "mp-sigmoid": lambda img, txt, t, b: _ref_sigmoid(img, txt, t, b),
    "siglip": lambda img, txt, t, b: _ref_sigmoid(img, txt[:, :1], t, b),
    "mp-softmax": lambda img, txt, t, b: _ref_softmax(img, txt, t),
    "clip": lambda img, txt, t, b: _ref_softmax(img, txt[:, :1], t),
}


def test_registry_holds_the_four_losses_by_name():
    assert sorted(LOSSES) == ["clip", "mp-sigmoid", "mp-softmax", "siglip"]
    assert all(make_loss(name).name == name for name in LOSSES)


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("t,b", [(math.log(10.0), -10.0), (0.3, 1.5), (math.log(100.0), -3.0)])
def test_loss_and_gradients_equal_brute_force(name, t, b):
    img = _unit(N, D, seed=1).requires_grad_()
    txt = _unit(N, M, D, seed=2)
    params = [torch.tensor(t, dtype=torch.float64, requires_grad=True),
              torch.tensor(b, dtype=torch.float64, requires_grad=True)]
    ours = make_loss(name)(img, txt, *params)
    ours_grads = torch.autograd.grad(ours, [img, *params])
    ref = REFERENCES[name](img, txt, *params)
    ref_grads = torch.autograd.grad(ref, [img, params[0]])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-10)
    for got, want in zip(ours_grads, ref_grads):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    if name in ("mp-softmax", "clip"):  # the bias cancels in a softmax
        assert ours_grads[2].item() == 0.0


@pytest.mark.parametrize("t,b", [(math.log(10.0), -10.0), (1.1, 2.0)])
def test_one_positive_losses_equal_open_clip(t, b):
    from open_clip.loss import ClipLoss as OpenClipLoss
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    img, txt = _unit(N, D, seed=3), _unit(N, M, D, seed=4)
    t, b = torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    # our one-positive losses use the first of the m drawn positives
    assert SigLipLoss()(img, txt, t, b).item() == pytest.approx(OpenSigLipLoss()(img, txt[:, 0], t.exp(), b).item(),
                                                                rel=1e-12)
    assert ClipLoss()(img, txt, t, b).item() == pytest.approx(OpenClipLoss()(img, txt[:, 0], t.exp()).item(),
                                                              rel=1e-12)
    # and mp-softmax with one positive is CLIP
    assert MultiPositiveSoftmaxLoss()(img, txt[:, :1], t, b).item() == pytest.approx(
        OpenClipLoss()(img, txt[:, 0], t.exp()).item(), rel=1e-12)


WORKER = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    from flame import distributed
    from flame.loss import LOSSES

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(12, 8, dtype=torch.float64)
            self.t = torch.nn.Parameter(torch.tensor(1.7, dtype=torch.float64))
            self.b = torch.nn.Parameter(torch.tensor(-4.0, dtype=torch.float64))
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
    results = {"x": x, "txt": txt}
    for name, cls in sorted(LOSSES.items()):
        torch.manual_seed(1)
        model = Tiny()
        ddp = distributed.wrap_ddp(model, device)
        img, t, b = ddp(x[r * B:(r + 1) * B])
        loss = cls()(img, txt[r * B:(r + 1) * B], t, b)
        loss.backward()
        results[name] = {"loss": distributed.all_reduce_mean(loss),
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
                         "state": {k: v.clone() for k, v in model.state_dict().items()}}
    if r == 0:
        torch.save(results, out)
    distributed.leave_together()
    distributed.shutdown()
    """
)


@pytest.mark.slow
def test_two_processes_equal_one_process_on_the_concatenated_batch(tmp_path):
    from open_clip.loss import ClipLoss as OpenClipLoss
    from open_clip.loss import SigLipLoss as OpenSigLipLoss

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [*TORCHRUN_2, str(script), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = torch.load(out, weights_only=False)
    x, txt = res["x"], res["txt"]
    open_clip = {"siglip": lambda img, t, b: OpenSigLipLoss()(img, txt[:, 0], t.exp(), b),
                 "clip": lambda img, t, b: OpenClipLoss()(img, txt[:, 0], t.exp())}
    for name in sorted(LOSSES):
        got = res[name]
        lin = torch.nn.Linear(12, 8, dtype=torch.float64)
        lin.load_state_dict({k[4:]: v for k, v in got["state"].items() if k.startswith("lin.")})
        t = torch.nn.Parameter(got["state"]["t"].clone())
        b = torch.nn.Parameter(got["state"]["b"].clone())
        img = F.normalize(lin(x), dim=-1)
        refs = [REFERENCES[name](img, txt, t, b)]
        if name in open_clip:
            refs.append(open_clip[name](img, t, b))
        for ref in refs:
            grads = torch.autograd.grad(ref, [lin.weight, lin.bias, t, b], retain_graph=True, allow_unused=True)
            assert abs(got["loss"].item() - ref.item()) < 1e-10, name
            for key, want in zip(["lin.weight", "lin.bias", "t", "b"], grads):
                want = torch.zeros_like(got["grads"][key]) if want is None else want  # b cancels in a softmax
                assert (got["grads"][key] - want).abs().max() < 1e-10, (name, key)


def test_loss_is_a_resume_comparable_setting():
    from flame.train import RESUME_FREE, TrainConfig

    cfg = TrainConfig(data=["d"], embeddings="e", out="o", loss="clip")
    assert "loss" not in RESUME_FREE and cfg.comparable()["loss"] == "clip"
    assert TrainConfig(data=["d"], embeddings="e", out="o").loss == "mp-sigmoid"
