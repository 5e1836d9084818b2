"""MultiPositiveSigmoidLoss against independent formulations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from flame import MultiPositiveSigmoidLoss
from flame.loss import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, MAX_LOGIT_SCALE, clamp_logit_scale_


def _siglip_reference(img, txt, t, b):
    """SigLIP (Zhai et al. 2023, Algorithm 1) written out independently: labels 2*eye-1,
    loss = -sum(log_sigmoid(labels * logits)) / n."""
    n = img.shape[0]
    logits = img @ txt.T * torch.exp(t) + b
    labels = 2 * torch.eye(n) - torch.ones(n, n)
    return -torch.sum(F.logsigmoid(labels * logits)) / n


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


@pytest.mark.parametrize("t,b", [(INIT_LOGIT_SCALE, INIT_LOGIT_BIAS), (0.3, 1.5), (MAX_LOGIT_SCALE, -3.0)])
def test_m1_equals_siglip(t, b):
    img, txt = _unit(7, 16, seed=1), _unit(7, 16, seed=2)
    t, b = torch.tensor(t, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    ours = MultiPositiveSigmoidLoss()(img, txt.unsqueeze(1), t, b)
    ref = _siglip_reference(img, txt, t, b)
    assert torch.allclose(ours, ref, rtol=1e-12, atol=1e-12)
    # a 2-D text tensor is accepted as m = 1
    assert torch.allclose(MultiPositiveSigmoidLoss()(img, txt, t, b), ref, rtol=1e-12, atol=1e-12)


def test_hand_computed_small_case():
    # B = 2 images, m = 2 texts each, D = 2; t = 0 (scale 1), b = 0.
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    txt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    # texts in order: a=(1,0) b=(0,1) [image 0], c=(0,1) d=(-1,0) [image 1]
    # image 0 dots: a=1 b=0 | c=0 d=-1 ; labels + + - -
    # image 1 dots: a=0 b=1 | c=1 d=0  ; labels - - + +
    ls = lambda x: math.log(1 / (1 + math.exp(-x)))
    total = (ls(1) + ls(0) + ls(-0) + ls(1)) + (ls(-0) + ls(-1) + ls(1) + ls(0))
    expected = -total / (2 * 2)
    got = MultiPositiveSigmoidLoss()(img, txt, torch.tensor(0.0, dtype=torch.float64),
                                     torch.tensor(0.0, dtype=torch.float64))
    assert got.item() == pytest.approx(expected, abs=1e-12)
    # with t = log 2, b = -1: logits = 2*dot - 1
    t, b = torch.tensor(math.log(2.0), dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    total = (ls(1) + ls(-1) + ls(1) + ls(3)) + (ls(1) + ls(-1) + ls(1) + ls(-1))
    got = MultiPositiveSigmoidLoss()(img, txt, t, b)
    assert got.item() == pytest.approx(-total / 4, abs=1e-12)


def test_multi_positive_equals_explicit_double_loop():
    B, m, D = 5, 3, 8
    img, txt = _unit(B, D, seed=3), _unit(B, m, D, seed=4)
    t, b = torch.tensor(1.1, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64)
    total = 0.0
    for i in range(B):
        for j in range(B):
            for k in range(m):
                logit = math.exp(t.item()) * float(img[i] @ txt[j, k]) + b.item()
                label = 1.0 if i == j else -1.0
                total += math.log(1 / (1 + math.exp(-label * logit)))
    got = MultiPositiveSigmoidLoss()(img, txt, t, b)
    assert got.item() == pytest.approx(-total / (m * B), rel=1e-10)


def test_gradients_flow_to_image_and_logit_params_not_text():
    img = _unit(4, 8, seed=5).float().requires_grad_()
    txt = _unit(4, 2, 8, seed=6).float()
    t = torch.tensor(INIT_LOGIT_SCALE, requires_grad=True)
    b = torch.tensor(INIT_LOGIT_BIAS, requires_grad=True)
    MultiPositiveSigmoidLoss()(img, txt, t, b).backward()
    assert img.grad.abs().sum() > 0 and t.grad != 0 and b.grad != 0
    assert not txt.requires_grad


def test_clamp():
    t = torch.nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale_(t)
    assert t.item() == pytest.approx(math.log(100))
    t.data.fill_(-1.0)
    clamp_logit_scale_(t)
    assert t.item() == 0.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError):
        MultiPositiveSigmoidLoss()(torch.zeros(3, 4), torch.zeros(2, 1, 4), torch.tensor(0.0), torch.tensor(0.0))


def test_anisotropic_logit_scale_matches_the_pairwise_cosines():
    """Vectors a*mu + b*r_i (r_i orthonormal, orthogonal to mu) have every pairwise cosine a^2: t must be
    10 / sqrt(1 - a^2); an isotropic set keeps the recipe's 10; a near-collapsed one stops at 100."""
    from flame.loss import anisotropic_logit_scale

    q, _ = torch.linalg.qr(torch.randn(64, 33, dtype=torch.float64))
    mu, r = q[:, 0], q[:, 1:].T  # 32 orthonormal directions, all orthogonal to mu
    for a2 in (0.5, 0.91):
        x = (a2**0.5) * mu + ((1 - a2) ** 0.5) * r
        brute = torch.stack([x[i] @ x[j] for i in range(32) for j in range(32) if i != j]).mean().item()
        assert brute == pytest.approx(a2)
        assert anisotropic_logit_scale(x.float() * 3.0) == pytest.approx(10 / (1 - brute) ** 0.5, rel=1e-5)
    assert anisotropic_logit_scale(r.float()) == pytest.approx(10.0)  # orthogonal: mean cosine 0
    assert anisotropic_logit_scale(mu.expand(8, -1).float()) == pytest.approx(100.0)  # identical: capped
