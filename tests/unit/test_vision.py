"""Image tower: registry, raw tokens without final norm/proj, projector, pooling, init."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flame.errors import FlameError
from flame.model import FlameModel
from flame.vision import TOWERS, ImageTower, TowerConfig, build_trunk


def _tiny(**kw):
    return TowerConfig(tower="vit-tiny", embed_dim=24, proj_hidden=32, image_size=32, **kw)


def test_registry_has_paper_towers():
    assert {"vit-tiny", "vit-b-16", "vit-l-14"} <= set(TOWERS)


def test_unknown_tower():
    with pytest.raises(FlameError, match="unknown tower"):
        build_trunk("vit-nope")
    with pytest.raises(FlameError, match="unknown timm model"):
        build_trunk("timm:definitely_not_a_model")


def test_open_clip_trunk_is_vit_without_final_norm_or_proj():
    torch.manual_seed(0)
    trunk = build_trunk("vit-tiny", image_size=32)
    x = torch.randn(2, 3, 32, 32)
    tokens = trunk(x)
    assert tokens.shape == (2, 1 + (32 // 8) ** 2, 96)
    vit = trunk.vit
    names = [n for n, _ in trunk.named_parameters()]
    assert not any("ln_post" in n or n.endswith("proj") and "attn" not in n and "mlp" not in n for n in names)
    # independent recomputation of the trunk with open_clip's own modules
    y = vit.conv1(x).flatten(2).transpose(1, 2)
    y = torch.cat([vit.class_embedding.expand(2, 1, -1), y], dim=1) + vit.positional_embedding
    y = vit.transformer(vit.ln_pre(y))
    assert torch.allclose(tokens, y, atol=1e-6)


def test_pooling_excludes_class_token_and_normalises():
    torch.manual_seed(0)
    tower = ImageTower(_tiny())
    x = torch.randn(3, 3, 32, 32)
    out = tower(x)
    assert out.shape == (3, 24)
    assert torch.allclose(out.norm(dim=-1), torch.ones(3), atol=1e-5)
    tokens = tower.trunk(x)
    expected = F.normalize(tower.projector(tokens[:, 1:]).mean(1), dim=-1)
    assert torch.allclose(out, expected, atol=1e-6)
    # pool-first variant averages tokens before projecting
    pf = ImageTower(_tiny(pool_first=True))
    pf.load_state_dict(tower.state_dict())
    expected_pf = F.normalize(tower.projector(tokens[:, 1:].mean(1)), dim=-1)
    assert torch.allclose(pf(x), expected_pf, atol=1e-6)
    assert not torch.allclose(pf(x), out, atol=1e-3)


def test_projector_default_hidden():
    assert TowerConfig(embed_dim=5120).hidden == 5120
    assert TowerConfig(embed_dim=576).hidden == 4096
    assert TowerConfig(embed_dim=576, proj_hidden=64).hidden == 64


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(0)
    a = ImageTower(_tiny())
    b = ImageTower(_tiny())
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b.train()
    b(x).sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), n


def test_timm_trunk_tokens():
    trunk = build_trunk("timm:vit_tiny_patch16_224", image_size=32)
    tokens = trunk(torch.randn(1, 3, 32, 32))
    assert tokens.shape == (1, 1 + 4, 192)
    assert trunk.num_prefix_tokens == 1
    assert isinstance(trunk.model.norm, torch.nn.Identity)


def test_init_from_local_tower_checkpoint(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(1)
    src = build_trunk("vit-tiny", image_size=32)
    # as an open_clip CLIP checkpoint would store it: "visual." prefix, plus ln_post / proj
    sd = {f"visual.{k[len('vit.'):]}": v for k, v in src.state_dict().items()}
    sd["visual.proj"] = torch.zeros(96, 16)
    save_file(sd, str(tmp_path / "tower.safetensors"))
    torch.manual_seed(2)
    tower = ImageTower(_tiny())
    info = tower.init_trunk_from(tmp_path / "tower.safetensors")
    assert info["missing"] == []
    for k, v in src.state_dict().items():
        assert torch.equal(tower.trunk.state_dict()[k], v)
    torch.save({"state_dict": {"nothing": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(FlameError, match="no weights matching"):
        tower.init_trunk_from(tmp_path / "bad.pt")


def test_model_save_load_roundtrip(tmp_path):
    torch.manual_seed(0)
    text = {"llm": {"spec": "x", "fingerprint": "abc"}, "layer": -2, "k": 3, "dim": 24}
    model = FlameModel(_tiny(), text)
    model.logit_scale.data.fill_(1.234)
    model.save(tmp_path / "m")
    loaded = FlameModel.load(tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.encode_image(x), loaded.encode_image(x))
    assert loaded.text == text and loaded.logit_scale.item() == pytest.approx(1.234)
    cfg = FlameModel.read_config(tmp_path / "m")
    assert cfg["tower"]["tower"] == "vit-tiny" and cfg["image"]["size"] == 32
