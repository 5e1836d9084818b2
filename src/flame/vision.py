"""Image tower (FLAME.md section 4): a ViT trunk, a per-token projector, mean pooling.

The trunk is a library ViT run *without* its final norm and projection, so every output
token (class token + patch tokens) comes out raw:

- open_clip's `VisionTransformer` (what the released FLAME checkpoint uses): conv1 ->
  class + positional embedding -> ln_pre -> transformer; `ln_post` / `proj` are removed;
- any timm ViT by name (`timm:vit_small_patch16_224`): patch_embed -> pos embed -> blocks,
  with the final `norm` / `fc_norm` / head replaced by identities.

Towers are built from a registry of builders (`TOWERS`, plus the `timm:` prefix), never
with pretrained weights from the network; `init_trunk_from` loads local ones (`flame.towerinit`).

Projector, per token: Linear(width -> H) -> GELU -> Linear(H -> D) -> LayerNorm(D) with
D the LLM hidden size and H = max(D, 4096) by default. Pool: mean over patch tokens
(class/prefix tokens excluded), then L2 norm. `pool_first=True` averages the patch tokens
before the projector (one projector call per image instead of one per token).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flame.errors import FlameError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TowerConfig:
    """Everything needed to rebuild the image side (saved in a checkpoint's config.json)."""

    tower: str = "vit-b-16"
    embed_dim: int = 5120  # D: the LLM hidden size the projector maps into
    proj_hidden: int | None = None  # H; None -> max(D, 4096)
    pool_first: bool = False
    image_size: int | None = None  # None -> the tower's default
    tower_kwargs: dict = field(default_factory=dict)  # overrides for the registry builder

    @property
    def hidden(self) -> int:
        return self.proj_hidden if self.proj_hidden else max(self.embed_dim, 4096)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TowerConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


class Trunk(nn.Module):
    """A ViT trunk: images [B,3,S,S] -> all tokens [B, prefix + patches, width]."""

    width: int
    num_prefix_tokens: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError


class OpenClipTrunk(Trunk):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio=4.0):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        vit = VisionTransformer(
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=layers,
            heads=heads,
            mlp_ratio=mlp_ratio,
            output_dim=width,
        )
        # FLAME uses the raw tokens: drop the final norm and projection so they hold no
        # (unused) parameters, which DDP would otherwise reject.
        vit.ln_post = nn.Identity()
        vit.proj = None
        self.vit = vit
        self.width = width
        self.num_prefix_tokens = 1
        self.image_size = image_size
        self.mean, self.std = OPENAI_MEAN, OPENAI_STD

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit._embeds(images)
        return self.vit.transformer(x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.vit.set_grad_checkpointing(enable)


class TimmTrunk(Trunk):
    def __init__(self, name: str, image_size: int | None = None, **kwargs):
        super().__init__()
        import timm

        if not timm.list_models(name):
            raise FlameError(f"unknown timm model {name!r} (see timm.list_models())")
        if image_size:
            kwargs["img_size"] = image_size
        try:
            model = timm.create_model(name, pretrained=False, num_classes=0, global_pool="", **kwargs)
        except Exception as e:  # timm raises many types for bad kwargs
            raise FlameError(f"cannot build timm model {name!r}: {e}") from e
        if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
            raise FlameError(f"timm model {name!r} is not a ViT (no patch_embed/blocks)")
        for attr in ("norm", "fc_norm", "head_drop", "head"):
            if isinstance(getattr(model, attr, None), nn.Module):
                setattr(model, attr, nn.Identity())
        if getattr(model, "attn_pool", None) is not None:
            model.attn_pool = None
        self.model = model
        self.width = model.embed_dim
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        size = model.patch_embed.img_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_STD))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(images)  # final norm is an Identity now

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)


def _open_clip(image_size: int, patch_size: int, width: int, layers: int, heads: int):
    def build(image_size: int | None = None, **overrides) -> Trunk:
        kw = dict(image_size=image_size or default_size, patch_size=patch_size, width=width, layers=layers,
                  heads=heads)
        kw.update(overrides)
        return OpenClipTrunk(**kw)

    default_size = image_size
    return build


# name -> builder(image_size=None, **overrides) -> Trunk
TOWERS: dict[str, Callable[..., Trunk]] = {
    "vit-tiny": _open_clip(image_size=64, patch_size=8, width=96, layers=3, heads=4),
    "vit-s-16": _open_clip(image_size=224, patch_size=16, width=384, layers=12, heads=6),
    "vit-b-16": _open_clip(image_size=224, patch_size=16, width=768, layers=12, heads=12),
    "vit-b-32": _open_clip(image_size=224, patch_size=32, width=768, layers=12, heads=12),
    "vit-l-14": _open_clip(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
}
# prefix -> builder(name_after_prefix, image_size=None, **overrides)
TOWER_PREFIXES: dict[str, Callable[..., Trunk]] = {
    "timm": lambda name, image_size=None, **kw: TimmTrunk(name, image_size=image_size, **kw),
}


def known_towers() -> list[str]:
    return sorted(TOWERS) + [f"{p}:<name>" for p in TOWER_PREFIXES]


def check_tower_name(name: str) -> None:
    prefix, sep, rest = name.partition(":")
    if sep and prefix in TOWER_PREFIXES and rest:
        if prefix == "timm":
            import timm

            if not timm.list_models(rest):
                raise FlameError(f"unknown timm model {rest!r} in tower {name!r} (see timm.list_models())")
        return
    if name not in TOWERS:
        raise FlameError(f"unknown tower {name!r}; known: {', '.join(known_towers())}")


def build_trunk(name: str, image_size: int | None = None, **overrides) -> Trunk:
    check_tower_name(name)
    prefix, sep, rest = name.partition(":")
    if sep and prefix in TOWER_PREFIXES:
        return TOWER_PREFIXES[prefix](rest, image_size=image_size, **overrides)
    try:
        return TOWERS[name](image_size=image_size, **overrides)
    except TypeError as e:
        raise FlameError(f"bad tower options for {name!r}: {e}") from e


class Projector(nn.Sequential):
    def __init__(self, width: int, hidden: int, dim: int):
        super().__init__(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.LayerNorm(dim))


class ImageTower(nn.Module):
    """Trunk + projector + pooling: images -> L2-normalised [B, D] embeddings."""

    def __init__(self, config: TowerConfig):
        super().__init__()
        self.config = config
        self.trunk = build_trunk(config.tower, image_size=config.image_size, **config.tower_kwargs)
        self.projector = Projector(self.trunk.width, config.hidden, config.embed_dim)

    @property
    def image_size(self) -> int:
        return self.trunk.image_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features before the projector (what linear probing uses): [B, width]."""
        return self.trunk(images)[:, self.trunk.num_prefix_tokens :].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.trunk(images)[:, self.trunk.num_prefix_tokens :]  # patch tokens only
        if self.config.pool_first:
            pooled = self.projector(tokens.mean(dim=1))
        else:
            pooled = self.projector(tokens).mean(dim=1)
        return F.normalize(pooled.float(), dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def init_trunk_from(self, spec: str | Path, cache_dir: str | Path | None = None) -> dict:
        """Load pretrained weights into the trunk: a local state-dict file or folder, or an
        open_clip / timm checkpoint in the local Hugging Face cache (`flame.towerinit` says which
        specs and key formats; nothing is downloaded). Raises one FlameError unless every trunk
        tensor is found with its shape."""
        from flame.towerinit import load_trunk

        return load_trunk(self.trunk, spec, self.config.tower, cache_dir)
