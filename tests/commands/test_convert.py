"""`flame convert`: a release-style checkpoint (open_clip VisionTransformer `visual` + the
`mm` projector, random init, tiny) converted to a FlameModel gives the image vectors the
release's own forward gives; bad checkpoints are one line and exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import LayerNorm, VisionTransformer
from support.commands import one_line, run_flame
from support.payloads import Evil
from torch import nn

from flame import FlameModel
from flame.convert import RELEASE_CONFIGS, config_from_release_json, resolve_config

WIDTH, LAYERS, PATCH, SIZE, HEAD_WIDTH, D = 64, 2, 8, 32, 32, 48
HIDDEN = max(D, 4096)  # the release's projector hidden size rule

# a tiny config in the release's own model_configs format
TINY_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIZE, "layers": LAYERS, "width": WIDTH, "patch_size": PATCH,
                   "head_width": HEAD_WIDTH, "pool_type": "avg"},
    "mm_cfg": {"mm_projector": True, "width": WIDTH, "mlp_depth": 2, "projector_dim": D},
    "text_cfg": {"context_length": 1024, "llm_model_name": "mistralai/Mistral-Nemo-Instruct-2407",
                 "llm_tokenizer_name": "mistralai/Mistral-Nemo-Instruct-2407", "layer": "39",
                 "load_in_8bit": False, "embedding_method": "multiprompteol"},
    "custom_text": True,
}


class ReleaseStyle(nn.Module):
    """The release's CustomTextCLIP image side, built from open_clip pieces: `visual` with its
    final norm and projection present (as saved), `mm` = Linear, GELU, Linear, LayerNorm, a
    stand-in `text` LLM, and the logit scale / bias."""

    def __init__(self, seed: int = 0, dim: int = D):
        super().__init__()
        torch.manual_seed(seed)
        self.visual = VisionTransformer(
            image_size=SIZE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=WIDTH // HEAD_WIDTH,
            mlp_ratio=4.0, output_dim=16,
        )
        hidden = max(dim, 4096)
        self.mm = nn.Sequential(nn.Linear(WIDTH, hidden), nn.GELU(), nn.Linear(hidden, dim), LayerNorm(dim))
        self.text = nn.Module()
        self.text.model = nn.Linear(4, 4)  # the release saves its LLM under text.*
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        with torch.no_grad():  # move every parameter off its init (norm weights, biases) so all of them matter
            for p in self.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        self.eval()

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The release's `visual.get_features`: every output token, no ln_post, no proj."""
        v = self.visual
        x = v.conv1(images)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = v.class_embedding.reshape(1, 1, -1).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding
        x = v.ln_pre(x)
        return v.transformer(x)  # open_clip 3.x blocks are batch-first

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """The release's encode_image(normalize=True): projector per token (class token
        included), then its 'avg' pool over the patch tokens, then L2 norm."""
        x = self.mm(self.tokens(images))
        return F.normalize(x[:, 1:].mean(dim=1), dim=-1)

    @torch.no_grad()
    def encode_image_visual_only(self, images: torch.Tensor) -> torch.Tensor:
        """The release's encode_image(visual_only=True), used for linear probing."""
        return self.tokens(images)[:, 1:].mean(dim=1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    model = ReleaseStyle()
    (root / "tiny.json").write_text(json.dumps(TINY_CONFIG))
    return root, model


def _save(model: ReleaseStyle, path: Path, module: bool, wrapped: bool) -> Path:
    sd = model.state_dict()
    if module:  # saved from DDP
        sd = {f"module.{k}": v for k, v in sd.items()}
    if wrapped:  # a training checkpoint
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        obj = {"epoch": 32, "name": "run", "state_dict": sd, "optimizer": opt.state_dict()}
    else:
        obj = sd
    torch.save(obj, path)
    return path


def _convert(capsys, *args):
    return run_flame(capsys, "convert", *args)


@pytest.mark.parametrize("module,wrapped", [(False, False), (True, False), (False, True), (True, True)])
def test_converted_model_gives_the_release_vectors(tmp_path, capsys, release, module, wrapped):
    root, model = release
    ckpt = _save(model, tmp_path / "epoch_32.pt", module, wrapped)
    code, out, err = _convert(capsys, ckpt, "--out", tmp_path / "flame", "--config", root / "tiny.json")
    assert code == 0, err
    assert "no LLM fingerprint" in out and "3 unused head tensors" in out and "2 LLM tensors" in out
    converted = FlameModel.from_pretrained(tmp_path / "flame")
    images = torch.randn(3, 3, SIZE, SIZE)
    torch.testing.assert_close(converted.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        converted.image_features(images), model.encode_image_visual_only(images), atol=1e-5, rtol=0
    )
    assert converted.logit_scale.item() == model.logit_scale.item()
    assert converted.logit_bias.item() == model.logit_bias.item()


def test_pil_images_go_through_the_release_transform(tmp_path, capsys, release):
    """PIL input: FlameModel's preprocessing equals open_clip's eval transform (the release's)."""
    import numpy as np
    from open_clip.transform import image_transform
    from PIL import Image

    root, model = release
    ckpt = _save(model, tmp_path / "ckpt.pt", module=False, wrapped=False)
    assert _convert(capsys, ckpt, "--out", tmp_path / "flame", "--config", root / "tiny.json")[0] == 0
    converted = FlameModel.from_pretrained(tmp_path / "flame")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 56), (64, 48))]
    preprocess = image_transform(SIZE, is_train=False)  # open_clip's val transform, OpenAI mean/std
    want = model.encode_image(torch.stack([preprocess(im) for im in images]))
    torch.testing.assert_close(converted.encode_image(images), want, atol=1e-5, rtol=0)


def test_config_json_names_the_release_text_side(tmp_path, capsys, release):
    root, model = release
    ckpt = _save(model, tmp_path / "ckpt.pt", module=True, wrapped=True)
    assert _convert(capsys, ckpt, "--out", tmp_path / "flame", "--config", root / "tiny.json")[0] == 0
    cfg = json.loads((tmp_path / "flame" / "config.json").read_text())
    text = cfg["text"]
    assert text["llm"] == {"spec": "mistralai/Mistral-Nemo-Instruct-2407", "fingerprint": None}
    assert text["layer"] == [39] and text["positions"] == "continue" and text["dim"] == D and text["k"] == 11
    sets = {s["name"]: s for s in text["prompt_sets"]}
    assert list(sets) == ["raw", "short", "long"]
    # the release's texts: its prefixes and facet questions (embed_cc3m_mask.py, with '_' read as ' ')
    assert sets["raw"]["prefix"] == 'Image description : "{cap}" . After thinking step by step , '
    assert sets["long"]["prefix"] == 'Detailed Image description : "{cap}" . After thinking step by step , '
    assert sets["long"]["facets"][0] == 'this image description means in just one word:"'
    assert sets["long"]["facets"][6] == 'the overall atmosphere or emotion of this image means in just one word:"'
    assert sets["short"]["facets"] == sets["long"]["facets"][:3] and len(sets["raw"]["facets"]) == 1
    assert sets["raw"]["sep"] == "" and "<s>" in sets["long"]["sep"] and "<s>" in sets["short"]["sep"]
    assert cfg["tower"]["embed_dim"] == D and cfg["tower"]["proj_hidden"] == HIDDEN
    assert cfg["image"]["size"] == SIZE


def test_registry_matches_the_release_configs():
    """The registered configs equal the release's model_configs files (their numbers, given
    here in the release's format) and build the towers the release's checkpoints fit."""
    b16 = {"vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16, "pool_type": "avg"},
           "mm_cfg": {"mm_projector": True, "width": 768, "mlp_depth": 2, "projector_dim": 5120},
           "text_cfg": {"llm_model_name": "mistralai/Mistral-Nemo-Instruct-2407", "layer": "39"}}
    l14 = {"vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14, "pool_type": "avg"},
           "mm_cfg": {"mm_projector": True, "width": 1024, "mlp_depth": 2, "projector_dim": 5120},
           "text_cfg": {"llm_model_name": "mistralai/Mistral-Nemo-Instruct-2407", "layer": "39"}}
    for name, doc in (("FLAME-Mistral-Nemo-ViT-B-16", b16), ("FLAME-Mistral-Nemo-ViT-L-14", l14)):
        reg, parsed = RELEASE_CONFIGS[name], config_from_release_json(doc, name)
        assert reg.geometry() == parsed.geometry() and reg.heads == parsed.heads and reg.layer == parsed.layer
        with torch.device("meta"):
            sd = FlameModel(reg.tower_config(), reg.text_side()).state_dict()
        w, p = doc["vision_cfg"]["width"], doc["vision_cfg"]["patch_size"]
        assert sd["visual.trunk.vit.conv1.weight"].shape == (w, 3, p, p)
        assert sd["visual.trunk.vit.positional_embedding"].shape == ((224 // p) ** 2 + 1, w)
        assert sd["visual.projector.0.weight"].shape == (5120, w)
        assert sd["visual.projector.2.weight"].shape == (5120, 5120)
        n_blocks = len({k.split(".")[5] for k in sd if ".resblocks." in k})
        assert n_blocks == doc["vision_cfg"]["layers"]
    assert resolve_config("FLAME-Mistral-Nemo-ViT-B-16") is RELEASE_CONFIGS["FLAME-Mistral-Nemo-ViT-B-16"]


# ---- bad input: one line, exit 2 ------------------------------------------------------------
def test_not_a_release_checkpoint(tmp_path, capsys):
    other = {"encoder.layer.0.weight": torch.zeros(2), "head.bias": torch.zeros(1)}
    torch.save({"state_dict": other}, tmp_path / "x.pt")
    code, _, err = _convert(capsys, tmp_path / "x.pt", "--out", tmp_path / "o")
    assert code == 2
    line = one_line(err)
    assert "neither a FLAME release checkpoint" in line and "encoder.layer.0.weight" in line
    torch.save({"model": {"w": 1}, "epoch": 3}, tmp_path / "nested.pt")
    code, _, err = _convert(capsys, tmp_path / "nested.pt", "--out", tmp_path / "o")
    assert code == 2 and "no tensors (top-level keys: model, epoch)" in one_line(err)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all" * 10)
    code, _, err = _convert(capsys, tmp_path / "junk.pt", "--out", tmp_path / "o")
    assert code == 2 and "cannot read" in one_line(err)
    assert not (tmp_path / "o").exists()


def test_a_flame_model_is_not_converted_again(tmp_path, capsys, release):
    root, model = release
    _save(model, tmp_path / "ckpt.pt", module=False, wrapped=False)
    assert _convert(capsys, tmp_path / "ckpt.pt", "--out", tmp_path / "flame", "--config", root / "tiny.json")[0] == 0
    for given in (tmp_path / "flame", tmp_path / "flame" / "model.safetensors"):
        code, _, err = _convert(capsys, given, "--out", tmp_path / "again")
        assert code == 2 and "already a FLAME model" in one_line(err)


def test_tower_that_does_not_match_the_config(tmp_path, capsys, release):
    root, model = release
    _save(model, tmp_path / "ckpt.pt", module=True, wrapped=True)
    code, _, err = _convert(capsys, tmp_path / "ckpt.pt", "--out", tmp_path / "o")  # default: ViT-B/16
    assert code == 2
    line = one_line(err)
    assert "does not match --config FLAME-Mistral-Nemo-ViT-B-16" in line and "width 64" in line
    assert not (tmp_path / "o").exists()
    # a plain open_clip CLIP image tower without FLAME's projector
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("mm.")}
    torch.save(sd, tmp_path / "clip.pt")
    code, _, err = _convert(capsys, tmp_path / "clip.pt", "--out", tmp_path / "o")
    assert code == 2 and "without the FLAME `mm` projector" in one_line(err)
    # an unsupported option in a config file
    bad = json.loads(json.dumps(TINY_CONFIG))
    bad["vision_cfg"]["no_ln_pre"] = True
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, _, err = _convert(capsys, tmp_path / "ckpt.pt", "--out", tmp_path / "o", "--config", tmp_path / "bad.json")
    assert code == 2 and "no_ln_pre" in one_line(err)
    del bad["vision_cfg"]["no_ln_pre"], bad["vision_cfg"]["pool_type"]  # open_clip's default: class-token pooling
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    code, _, err = _convert(capsys, tmp_path / "ckpt.pt", "--out", tmp_path / "o", "--config", tmp_path / "bad.json")
    assert code == 2 and "pool_type" in one_line(err)


def test_checkpoint_that_would_run_code_is_refused(tmp_path, capsys):
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {"visual.conv1.weight": torch.zeros(1)}, "x": Evil(marker)}, tmp_path / "evil.pt")
    torch.load(tmp_path / "evil.pt", weights_only=False)  # the payload is live
    assert marker.exists()
    marker.unlink()
    code, _, err = _convert(capsys, tmp_path / "evil.pt", "--out", tmp_path / "o")
    assert code == 2
    line = one_line(err)
    assert "refused" in line and "evil.pt" in line
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_existing_out_needs_overwrite(tmp_path, capsys, release):
    root, model = release
    _save(model, tmp_path / "ckpt.pt", module=False, wrapped=False)
    args = [tmp_path / "ckpt.pt", "--out", tmp_path / "flame", "--config", root / "tiny.json"]
    assert _convert(capsys, *args)[0] == 0
    code, _, err = _convert(capsys, *args)
    assert code == 2 and "--overwrite" in one_line(err)
    assert _convert(capsys, *args, "--overwrite")[0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "flame"]  # no temporaries left


def test_converted_text_side_runs_on_a_local_llm(tmp_path, capsys, tiny_llm_dir):
    """The text block `flame convert` writes drives encode_text: the release's prompt texts,
    its layer and continue positions reach the facet encoder (here on the tiny LLM, named in
    a release-format config with layer 2 of its 3)."""
    from flame.facets import FacetEncoder
    from flame.llm import load_llm
    from flame.prompts import PROMPT_SETS

    model = ReleaseStyle(dim=32)  # D = the tiny LLM's hidden size
    cfg = json.loads(json.dumps(TINY_CONFIG))
    cfg["mm_cfg"]["projector_dim"] = 32
    cfg["text_cfg"].update(llm_model_name=str(tiny_llm_dir), layer="2")
    (tmp_path / "tiny-llm.json").write_text(json.dumps(cfg))
    _save(model, tmp_path / "ckpt.pt", module=True, wrapped=True)
    code, _, err = _convert(capsys, tmp_path / "ckpt.pt", "--out", tmp_path / "flame", "--config",
                            tmp_path / "tiny-llm.json")
    assert code == 0, err
    converted = FlameModel.from_pretrained(tmp_path / "flame", cache_dir=tmp_path / "cache")
    assert converted.text["llm"]["spec"] == str(tiny_llm_dir) and converted.text["layer"] == [2]
    texts = ['a "red" car on the street?', "two dogs in the park"]
    llm, tok = load_llm(str(tiny_llm_dir), device="cpu")
    for name in ("raw", "long"):
        enc = FacetEncoder(llm, tok, prompts=PROMPT_SETS[name], layer=[2], positions="continue")
        want = F.normalize(enc.encode(texts).float().mean(dim=1), dim=-1)
        got = converted.encode_text(texts, prompts=name)
        assert got.shape == (2, 32)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)  # the text cache holds float16


@pytest.mark.parametrize("name,embed_dim", [("FLAME-Mistral-Nemo-ViT-B-16", 512), ("FLAME-Mistral-Nemo-ViT-L-14", 768)])
def test_full_size_release_layout_maps_onto_the_registered_config(name, embed_dim):
    """A full-size release model's state-dict layout (open_clip tower with ln_post and proj, the
    mm projector; built on the meta device, no memory) maps onto the registered config exactly,
    and the other config is refused with a pointer to the right one."""
    from flame.convert import check_against, map_release_state
    from flame.errors import FlameError

    cfg = RELEASE_CONFIGS[name]
    with torch.device("meta"):
        release = nn.Module()
        release.visual = VisionTransformer(
            image_size=cfg.image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
            heads=cfg.width // 64, mlp_ratio=4.0, output_dim=embed_dim,
        )
        h = max(5120, 4096)
        release.mm = nn.Sequential(nn.Linear(cfg.width, h), nn.GELU(), nn.Linear(h, 5120), LayerNorm(5120))
        release.logit_scale = nn.Parameter(torch.zeros(()))
        release.logit_bias = nn.Parameter(torch.zeros(()))
    state = release.state_dict()
    mapped, dropped = map_release_state(state)
    assert dropped == {"head": 3, "llm": 0}
    check_against(mapped, cfg, state)  # every tensor present, every shape equal
    other = next(c for n, c in RELEASE_CONFIGS.items() if n != name)
    with pytest.raises(FlameError, match=f"does not match --config {other.name}.*that is --config {name}"):
        check_against(mapped, other, state)


@pytest.mark.parametrize("yaml_text, message", [
    ("overwrite: maybe\n", "--overwrite (overwrite): expected true or false, got 'maybe'"),
    ("release_config: ViT-Z-99\n", "--release-config must be a release config"),
])
def test_settings_file_with_a_wrong_type_or_value_is_one_line(tmp_path, capsys, yaml_text, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml_text)
    code, _, err = _convert(capsys, tmp_path / "ckpt.pt", "--out", tmp_path / "o", "--config", bad)
    assert code == 2 and message in one_line(err) and not (tmp_path / "o").exists()


def test_help_shows_defaults_from_the_config(capsys):
    with pytest.raises(SystemExit):
        _convert(capsys, "--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "(default FLAME-Mistral-Nemo-ViT-B-16)" in out and "--config FILE" in out


def test_a_converted_model_records_its_provenance_and_its_card_shows_it(tmp_path, capsys, release):
    import hashlib

    from huggingface_hub import ModelCard

    root, model = release
    ckpt = _save(model, tmp_path / "epoch_32.pt", module=False, wrapped=True)
    assert _convert(capsys, ckpt, "--out", tmp_path / "flame", "--config", root / "tiny.json")[0] == 0
    prov = json.loads((tmp_path / "flame" / "config.json").read_text())["provenance"]
    assert prov["checkpoint"] == "epoch_32.pt" and prov["release_config"] == "tiny"
    assert prov["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert prov["origin"].startswith("FLAME release") and prov["converted_by"].startswith("flame convert")
    converted = FlameModel.from_pretrained(tmp_path / "flame")
    assert converted.provenance == prov
    code, out, err = run_flame(capsys, "push", tmp_path / "flame", "me/flame-tiny", "--dry-run", tmp_path / "shared")
    assert code == 0, err
    card = ModelCard.load(tmp_path / "shared" / "README.md")
    assert card.data.model_name == "flame-tiny" and "Converted, not trained here" in card.text
    assert f"| checkpoint_sha256 | {prov['checkpoint_sha256']} |" in card.text
    assert "| LLM | mistralai/Mistral-Nemo-Instruct-2407 |" in card.text and "| hidden-state layer | 39 |" in card.text
    again = FlameModel.from_pretrained(tmp_path / "shared")
    assert again.provenance == prov  # save_pretrained keeps it
