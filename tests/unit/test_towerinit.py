"""--tower-init: open_clip and timm checkpoints, saved by those libraries in their own formats, in
a folder or a local Hugging Face cache, load into FLAME's trunks with the libraries' own forward
outputs; what does not fit is one FlameError line. And --lock-image freezes what open_clip's
lock_image_tower / timm's layer groups freeze."""

from __future__ import annotations

import pytest
import torch
from support.towers import (
    TIMM_NAME,
    TIMM_TINY,
    put_in_hub_cache,
    save_open_clip,
    save_timm,
    tiny_clip,
    tiny_timm,
)

from flame.errors import FlameError
from flame.vision import ImageTower, TowerConfig

TIMM_TAG = f"{TIMM_NAME}.augreg_in21k"
TIMM_TOWER_KW = {k: v for k, v in TIMM_TINY.items() if k != "img_size"}


def _clip_tower(seed=5):
    torch.manual_seed(seed)  # another init than the source: loading must overwrite every tensor
    return ImageTower(TowerConfig(tower="vit-tiny", embed_dim=16, proj_hidden=32, image_size=32)).eval()


def _timm_tower(seed=5):
    torch.manual_seed(seed)
    return ImageTower(TowerConfig(tower=f"timm:{TIMM_NAME}", embed_dim=16, proj_hidden=32, image_size=32,
                                  tower_kwargs=TIMM_TOWER_KW)).eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny open_clip CLIP and a tiny timm ViT, each saved by its library for the hub, in
    folders and in one local Hugging Face cache."""
    root = tmp_path_factory.mktemp("towers")
    clip, cfg = tiny_clip(seed=1)
    vit = tiny_timm(seed=2)
    clip_dir = save_open_clip(clip, cfg, root / "clip")
    timm_dir = save_timm(vit, root / "timm")
    cache = root / "hub"
    put_in_hub_cache(cache, "flame-test/tiny-clip", clip_dir)
    put_in_hub_cache(cache, f"timm/{TIMM_TAG}", timm_dir)
    default = __import__("timm").models.get_pretrained_cfg(TIMM_NAME).hf_hub_id  # the untagged name's weights
    put_in_hub_cache(cache, default, timm_dir)
    return {"clip": clip, "timm": vit, "clip_dir": clip_dir, "timm_dir": timm_dir, "cache": cache}


def test_the_fake_cache_is_what_huggingface_hub_reads(saved):
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    repos = {r.repo_id: r for r in scan_cache_dir(saved["cache"]).repos}
    assert {"flame-test/tiny-clip", f"timm/{TIMM_TAG}"} <= set(repos)
    assert {f.file_name for f in next(iter(repos["flame-test/tiny-clip"].revisions)).files} >= {
        "open_clip_model.safetensors", "open_clip_pytorch_model.bin"}
    assert try_to_load_from_cache("flame-test/tiny-clip", "open_clip_model.safetensors", cache_dir=saved["cache"])


def _open_clip_reference(clip, tower, x):
    """open_clip's own image embedding, and FLAME's trunk tokens through the same model's
    ln_post / class-token pool / proj (the parts FLAME's trunk leaves out)."""
    with torch.no_grad():
        tokens = tower.trunk(x)
        last = clip.visual.forward_intermediates(x, indices=1, output_fmt="NLC", output_extra_tokens=True)
        blocks_out = torch.cat([last["image_intermediates_prefix"][0], last["image_intermediates"][0]], dim=1)
        return clip.encode_image(x), clip.visual.ln_post(tokens)[:, 0] @ clip.visual.proj, tokens, blocks_out


@pytest.mark.parametrize("where", ["folder", "bin", "hub", "hub-file"])
def test_an_open_clip_checkpoint_gives_open_clips_forward(saved, where):
    spec = {"folder": saved["clip_dir"], "bin": saved["clip_dir"] / "open_clip_pytorch_model.bin",
            "hub": "hf-hub:flame-test/tiny-clip", "hub-file": "hf-hub:flame-test/tiny-clip/open_clip_pytorch_model.bin"}
    tower = _clip_tower()
    info = tower.init_trunk_from(spec[where], cache_dir=saved["cache"])
    # safetensors preferred wherever both are there; the explicit .bin path is read as given
    assert info["path"].name == ("open_clip_pytorch_model.bin" if where == "bin" else "open_clip_model.safetensors")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ref, ours, tokens, last = _open_clip_reference(saved["clip"], tower, x)
    assert torch.equal(ours, ref)
    assert torch.equal(tokens, last)  # the last block's class + patch tokens, before ln_post


def test_a_flame_checkpoints_visual_trunk_loads_too(saved, tmp_path):
    from safetensors.torch import save_file

    src = _clip_tower(seed=9)
    sd = {f"visual.{k}": v for k, v in src.state_dict().items()}
    sd.update(logit_scale=torch.zeros(()), logit_bias=torch.zeros(()))
    save_file(sd, str(tmp_path / "model.safetensors"))
    tower = _clip_tower()
    tower.init_trunk_from(tmp_path)
    assert all(torch.equal(v, src.trunk.state_dict()[k]) for k, v in tower.trunk.state_dict().items())


@pytest.mark.parametrize("spec", [f"timm:{TIMM_TAG}", f"hf-hub:timm/{TIMM_TAG}", "pretrained", "folder"])
def test_a_timm_checkpoint_gives_timms_forward(saved, spec):
    tower = _timm_tower()
    info = tower.init_trunk_from(saved["timm_dir"] if spec == "folder" else spec, cache_dir=saved["cache"])
    assert info["path"].name == "model.safetensors"
    vit = saved["timm"]
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens = tower.trunk(x)
        assert torch.equal(vit.norm(tokens), vit.forward_features(x))
        assert torch.equal(vit.forward_head(vit.norm(tokens)), vit(x))


def test_open_clip_pretrained_tags_resolve_through_open_clips_registry(tmp_path):
    import open_clip
    from huggingface_hub import try_to_load_from_cache
    from safetensors.torch import save_file

    from flame.towerinit import resolve

    repo = open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")["hf_hub"].strip("/")
    (tmp_path / "files").mkdir()
    save_file({"x": torch.zeros(1)}, str(tmp_path / "files" / "open_clip_model.safetensors"))
    put_in_hub_cache(tmp_path / "hub", repo, tmp_path / "files")
    got = resolve("open_clip:ViT-B-16/laion2b_s34b_b88k", "vit-b-16", cache_dir=tmp_path / "hub")
    assert str(got) == try_to_load_from_cache(repo, "open_clip_model.safetensors", cache_dir=tmp_path / "hub")


def _bad(saved, tmp_path, case):
    from safetensors.torch import save_file

    if case == "image size":
        clip, cfg = tiny_clip(image_size=64)
        return _clip_tower, save_open_clip(clip, cfg, tmp_path / "c"), "shape mismatch for positional_embedding"
    if case == "width":
        clip, cfg = tiny_clip(width=48)
        return _clip_tower, save_open_clip(clip, cfg, tmp_path / "c"), "shape mismatch for class_embedding"
    if case == "depth":
        clip, cfg = tiny_clip(layers=4)
        return _clip_tower, save_open_clip(clip, cfg, tmp_path / "c"), "12 unknown keys (e.g. transformer.resblocks.3."
    if case == "missing key":
        sd = dict(saved["clip"].state_dict())
        del sd["visual.ln_pre.weight"]
        save_file(sd, str(tmp_path / "m.safetensors"))
        return _clip_tower, tmp_path / "m.safetensors", "1 tower tensors missing (e.g. ln_pre.weight)"
    if case == "timm into open_clip":
        return _clip_tower, saved["timm_dir"], "holds timm ViT weights but the tower is a open_clip"
    if case == "open_clip into timm":
        return _timm_tower, saved["clip_dir"], "holds open_clip VisionTransformer weights but the tower is a timm"
    if case == "not a tower":
        save_file({"weight": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        return _clip_tower, tmp_path / "w.safetensors", "no weights matching"
    if case == "not cached":
        return _clip_tower, "hf-hub:flame-test/absent", "has none of open_clip_model.safetensors"
    if case == "no file":
        return _clip_tower, tmp_path / "nothing.safetensors", "does not exist"
    if case == "empty folder":
        return _clip_tower, tmp_path, "the folder holds none of"
    if case == "pretrained open_clip":
        return _clip_tower, "pretrained", "needs a timm:NAME tower"
    if case == "unknown tag":
        return _clip_tower, "open_clip:ViT-B-16/no_such_tag", "not an open_clip pretrained ARCH/TAG"
    return _timm_tower, "timm:no_such_model_xyz", "timm has no Hugging Face hub weights"


@pytest.mark.parametrize("case", ["image size", "width", "depth", "missing key", "timm into open_clip",
                                  "open_clip into timm", "not a tower", "not cached", "no file", "empty folder",
                                  "pretrained open_clip", "unknown tag", "unknown timm"])
def test_what_does_not_fit_is_one_line_and_loads_nothing(saved, tmp_path, case):
    make, spec, expect = _bad(saved, tmp_path, case)
    tower = make()
    before = {k: v.clone() for k, v in tower.trunk.state_dict().items()}
    with pytest.raises(FlameError) as e:
        tower.init_trunk_from(spec, cache_dir=saved["cache"])
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in tower.trunk.state_dict().items())


# -- what --lock-image freezes --------------------------------------------------------------
@pytest.mark.parametrize("unlocked", [0, 1, 2, 3])
def test_lock_freezes_what_open_clips_lock_image_tower_freezes(unlocked):
    from flame.train.freeze import lock_trunk

    clip, _ = tiny_clip()
    # open_clip's groups end [..., last block + ln_post, proj]: its N + 1 groups = FLAME's N blocks (+ proj)
    clip.lock_image_tower(unlocked_groups=unlocked + 1 if unlocked else 0)
    theirs = {n for n, p in clip.visual.named_parameters() if p.requires_grad and n not in ("proj",)
              and not n.startswith("ln_post")}
    tower = _clip_tower()
    lock_trunk(tower.trunk, unlocked)
    ours = {n.removeprefix("vit.") for n, p in tower.trunk.named_parameters() if p.requires_grad}
    assert ours == theirs
    assert all(p.requires_grad for p in tower.projector.parameters())


@pytest.mark.parametrize("unlocked", [0, 1, 2])
def test_lock_of_a_timm_trunk_follows_timms_layer_groups(unlocked):
    from timm.models import group_parameters

    from flame.train.freeze import lock_trunk

    tower = _timm_tower()
    groups = group_parameters(tower.trunk.model, tower.trunk.model.group_matcher())  # open_clip's TimmModel.lock
    last = max(groups) - unlocked
    theirs = {n for g, names in groups.items() if g > last for n in names}
    lock_trunk(tower.trunk, unlocked)
    assert {n.removeprefix("model.") for n, p in tower.trunk.named_parameters() if p.requires_grad} == theirs


def test_more_unlocked_blocks_than_the_trunk_has_is_one_line():
    from flame.train.freeze import lock_trunk

    with pytest.raises(FlameError, match="the trunk has only 3 blocks"):
        lock_trunk(_clip_tower().trunk, 4)


def test_a_frozen_batch_norm_keeps_and_uses_its_statistics_in_training():
    from flame.train.freeze import freeze_norm_statistics

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    reference = torch.nn.functional.batch_norm  # eval-mode batch norm: normalise with the running statistics
    freeze_norm_statistics(net[1])
    net.train()
    x = torch.randn(8, 3, 5, 5)
    stats = (net[1].running_mean.clone(), net[1].running_var.clone(), net[1].num_batches_tracked.clone())
    y = net(x)
    expected = reference(net[0](x), stats[0], stats[1], net[1].weight, net[1].bias, False, 0.0, net[1].eps)
    assert torch.equal(y, expected)
    assert all(torch.equal(a, b) for a, b in zip(stats, (net[1].running_mean, net[1].running_var,
                                                         net[1].num_batches_tracked)))
    assert set(net.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                     "1.num_batches_tracked"}


@pytest.mark.parametrize("make", [_clip_tower, _timm_tower], ids=["open_clip", "timm"])
def test_a_partly_locked_trunk_gets_the_same_gradients_with_activation_checkpointing(make):
    """Checkpointed blocks after frozen ones (the CUDA default) still pass gradients to the
    unlocked block: the same gradients as without checkpointing, and none for frozen tensors."""
    from flame.train.freeze import lock_trunk

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grads = []
    for checkpointing in (False, True):
        tower = make().train()
        lock_trunk(tower.trunk, 1)
        tower.set_grad_checkpointing(checkpointing)
        tower(x).square().sum().backward()
        grads.append({n: p.grad for n, p in tower.named_parameters()})
    plain, ckpt = grads
    trainable = {n for n, g in plain.items() if g is not None}
    assert trainable == {n for n, g in ckpt.items() if g is not None}
    assert any(".2." in n for n in trainable if n.startswith("trunk."))  # the last block (index 2) is trained
    assert not any(n.startswith("trunk.") and ".2." not in n for n in trainable)
    for n in trainable:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("unlocked", [0, 1])
def test_weight_decay_and_optimizer_groups_of_a_locked_model_follow_open_clips_training_script(unlocked):
    """open_clip's main.py: frozen parameters are in no group; of the trainable ones, 0-d/1-d,
    norm, bias and logit-scale tensors get no weight decay and the rest do."""
    from flame.model import FlameModel
    from flame.train.freeze import lock_trunk
    from flame.train.optim import param_groups

    torch.manual_seed(0)
    model = FlameModel(TowerConfig(tower="vit-tiny", embed_dim=16, proj_hidden=32, image_size=32))
    lock_trunk(model.visual.trunk, unlocked)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay, no_decay = param_groups(model, 0.5)
    assert {id(p) for p in decay["params"]} == {id(p) for n, p in named if not exclude(n, p)}
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in named if exclude(n, p)}
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.5, 0.0)
    frozen = {id(p) for p in model.visual.trunk.parameters() if not p.requires_grad}
    assert len(frozen) > 0 and not frozen & {id(p) for g in (decay, no_decay) for p in g["params"]}
