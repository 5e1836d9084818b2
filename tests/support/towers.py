"""Tiny pretrained towers in their libraries' own formats, and a local Hugging Face cache holding
them (huggingface_hub's layout: models--ORG--NAME/{blobs,refs,snapshots}), for the --tower-init
tests. Nothing here touches the network."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

# the open_clip config of a CLIP whose image tower has FLAME's vit-tiny shape at --image-size 32
TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 96, "layers": 3, "head_width": 24},
             "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}
TIMM_NAME = "vit_tiny_patch16_224"
TIMM_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 3, "num_heads": 4}


def tiny_clip(seed: int = 0, **vision):
    """open_clip's own CLIP model (eval mode) from TINY_CLIP, its vision config overridden by `vision`."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from open_clip.model import CLIP

    torch.manual_seed(seed)
    cfg = {**TINY_CLIP, "vision_cfg": {**TINY_CLIP["vision_cfg"], **vision}}
    model = CLIP(**cfg).eval()
    model.visual.image_mean, model.visual.image_std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD  # as create_model sets
    return model, cfg


def tiny_timm(seed: int = 0, name: str = TIMM_NAME, **kwargs):
    """timm's own ViT (eval mode) with TIMM_TINY's shape and a 10-class head."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, num_classes=10, **{**TIMM_TINY, **kwargs}).eval()


class _NoTokenizer:
    """open_clip's save_for_hf also saves a tokenizer; these tests need only the weights."""

    def save_pretrained(self, folder) -> None:
        pass


def save_open_clip(model, cfg: dict, folder: Path) -> Path:
    """As open_clip saves a model for the hub: open_clip_model.safetensors + open_clip_pytorch_model.bin
    + open_clip_config.json (its own `save_for_hf`)."""
    from open_clip.push_to_hf_hub import save_for_hf

    save_for_hf(model, _NoTokenizer(), cfg, str(folder), safe_serialization="both")
    return folder


def save_timm(model, folder: Path) -> Path:
    """As timm saves a model for the hub: model.safetensors + pytorch_model.bin + config.json."""
    from timm.models import save_for_hf

    save_for_hf(model, str(folder), safe_serialization="both")
    return folder


def put_in_hub_cache(cache: Path, repo: str, folder: Path, commit: str | None = None) -> Path:
    """Copy `folder`'s files into `cache` as huggingface_hub lays out a downloaded model repo:
    content-addressed blobs, refs/main -> the commit, snapshots/COMMIT/NAME -> the blob.
    Returns the snapshot folder."""
    commit = commit or hashlib.sha1(repo.encode()).hexdigest()
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    for f in sorted(folder.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, root / "blobs" / digest)
        link = snapshot / f.name
        if link.exists() or link.is_symlink():
            link.unlink()
        os.symlink(os.path.relpath(root / "blobs" / digest, snapshot), link)
    return snapshot


def trunk_keys_of_clip(model) -> dict[str, torch.Tensor]:
    """A CLIP's image-trunk tensors under FLAME's trunk names (what --tower-init must load)."""
    return {f"visual.trunk.vit.{k}": v for k, v in model.visual.state_dict().items()
            if not k.startswith(("ln_post", "proj"))}
