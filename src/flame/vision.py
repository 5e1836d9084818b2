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
    def from_dict(cls, d: dict, where: str = "tower") -> TowerConfig:
        """A saved config's "tower" block, every value checked for its type and range first (a
        model folder may come from anyone: see `check_tower_kwargs` and `check_tower_cost`)."""
        if not isinstance(d, dict):
            raise FlameError(f"{where} must be an object, not {type(d).__name__}")
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise FlameError(f"{where} has unknown key {unknown[0]!r} (known: {', '.join(cls.__dataclass_fields__)})")
        if not isinstance(d.get("tower"), str):
            raise FlameError(f"{where}.tower must be a tower name (a string), not {d.get('tower')!r}")
        _check_int(d.get("embed_dim"), f"{where}.embed_dim", 1, MAX_DIM)
        if d.get("proj_hidden") is not None:
            _check_int(d["proj_hidden"], f"{where}.proj_hidden", 1, MAX_DIM)
        if not isinstance(d.get("pool_first", False), bool):
            raise FlameError(f"{where}.pool_first must be true or false, not {d['pool_first']!r}")
        if d.get("image_size") is not None:
            _check_int(d["image_size"], f"{where}.image_size", 8, MAX_IMAGE_SIZE)
        kwargs = d.get("tower_kwargs", {})
        if not isinstance(kwargs, dict):
            raise FlameError(f"{where}.tower_kwargs must be an object, not {type(kwargs).__name__}")
        check_tower_name(d["tower"])
        check_tower_kwargs(d["tower"], kwargs, f"{where}.tower_kwargs")
        return cls(**d)


# -- what a saved config may ask for (it may come from a stranger) ------------------------------
MAX_DIM = 65_536  # embed_dim / proj_hidden (the widest LLMs have 16,384)
MAX_IMAGE_SIZE = 4_096
MAX_TOKENS = 16_384  # patch tokens per image (a 2,048-pixel image at patch 16)
MAX_PARAMETERS = 4_000_000_000  # trunk + projector: 16 GB in float32 (OpenCLIP's ViT-bigG-14 trunk: 1.8B)
# tower_kwargs a config may set, by builder kind: options that shape the architecture, plain
# values only. Anything else (timm's checkpoint_path / pretrained / pretrained_cfg*, which read
# files or the network, layer classes, ...) is refused.
_INT, _NUM, _BOOL = (int,), (int, float), (bool,)
TOWER_KWARGS: dict[str, dict[str, tuple]] = {
    "open_clip": {"patch_size": _INT, "width": _INT, "layers": _INT, "heads": _INT, "mlp_ratio": _NUM},
    "timm": {"patch_size": _INT, "embed_dim": _INT, "depth": _INT, "num_heads": _INT, "mlp_ratio": _NUM,
             "qkv_bias": _BOOL, "qk_norm": _BOOL, "class_token": _BOOL, "no_embed_class": _BOOL,
             "reg_tokens": _INT, "pre_norm": _BOOL, "dynamic_img_size": _BOOL, "init_values": _NUM,
             "drop_rate": _NUM, "attn_drop_rate": _NUM, "drop_path_rate": _NUM},
}

# upper bounds checked before the cost is computed (a depth of 10^5 would take minutes even on meta)
_KWARG_MAX = {"patch_size": 1024, "width": MAX_DIM, "embed_dim": MAX_DIM, "layers": 1024, "depth": 1024,
              "heads": 1024, "num_heads": 1024, "mlp_ratio": 64, "reg_tokens": 1024}


def _check_int(value, where: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise FlameError(f"{where} must be a whole number from {low:,} to {high:,}, not {value!r}")


def check_tower_kwargs(tower: str, kwargs: dict, where: str = "tower_kwargs") -> None:
    """Refuse a tower option that is not a known architecture option of its builder, or whose
    value is not a plain number/boolean of the expected kind (see TOWER_KWARGS)."""
    kind = "timm" if tower.partition(":")[1] else "open_clip"
    allowed = TOWER_KWARGS[kind]
    for key, value in kwargs.items():
        if key not in allowed:
            raise FlameError(
                f"{where}: option {key!r} is refused (a model config may set only {', '.join(allowed)} "
                f"for a {kind} tower; file, network and code options are never passed on)"
            )
        types = allowed[key]
        if isinstance(value, bool) != (types == _BOOL) or not isinstance(value, types):
            kind_name = "true or false" if types == _BOOL else "a number"
            raise FlameError(f"{where}.{key} must be {kind_name}, not {value!r}")
        if key.endswith("_rate") or key == "init_values":
            low, high = 0, 1
        else:
            low, high = 0 if key == "reg_tokens" else 1, _KWARG_MAX.get(key, 1)
        if types != _BOOL and not low <= value <= high:
            raise FlameError(f"{where}.{key} must be from {low} to {high:,}, not {value!r}")


def check_tower_cost(config: TowerConfig) -> None:
    """Refuse a tower whose size is absurd before any memory is given to it: the trunk is built
    on the meta device (shapes only, no storage) and its parameters plus the projector's, and
    its patch tokens per image, are held to MAX_PARAMETERS and MAX_TOKENS."""
    try:
        with torch.device("meta"):
            trunk = build_trunk(config.tower, image_size=config.image_size, **config.tower_kwargs)
    except FlameError:
        raise
    except Exception as e:  # the builders assert / raise many types for inconsistent geometry
        raise FlameError(f"cannot build tower {config.tower!r} with {config.tower_kwargs}: {e}") from e
    width, hidden, dim = trunk.width, config.hidden, config.embed_dim
    params = sum(p.numel() for p in trunk.parameters()) + width * hidden + hidden + hidden * dim + 3 * dim
    tokens = _patch_tokens(trunk)
    if params > MAX_PARAMETERS:
        raise FlameError(
            f"tower {config.tower!r} (width {width}, projector {width}->{hidden}->{dim}) would have "
            f"{params:,} parameters; more than the {MAX_PARAMETERS:,} a FLAME tower may have"
        )
    if tokens > MAX_TOKENS:
        raise FlameError(f"tower {config.tower!r} would see {tokens:,} patch tokens per image "
                         f"(image size {trunk.image_size}); at most {MAX_TOKENS:,}")


def _patch_tokens(trunk: Trunk) -> int:
    if isinstance(trunk, OpenClipTrunk):
        grid = trunk.vit.grid_size
    else:
        grid = trunk.model.patch_embed.grid_size
    return int(grid[0]) * int(grid[1])


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

        check_tower_kwargs(f"timm:{name}", kwargs)
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
    check_tower_kwargs(name, overrides)
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
        check_tower_cost(config)
        self.trunk = build_trunk(config.tower, image_size=config.image_size, **config.tower_kwargs)
        self.projector = Projector(self.trunk.width, config.hidden, config.embed_dim)

    @property
    def image_size(self) -> int:
        return self.trunk.image_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled trunk features before the projector (what linear probing uses): [B, width]."""
        return self.trunk(images)[:, self.trunk.num_prefix_tokens :].mean(dim=1)

    def project(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled projection before the L2 norm, float32 [B, D] (`encode_image(normalize=False)`)."""
        tokens = self.trunk(images)[:, self.trunk.num_prefix_tokens :]  # patch tokens only
        if self.config.pool_first:
            pooled = self.projector(tokens.mean(dim=1))
        else:
            pooled = self.projector(tokens).mean(dim=1)
        return pooled.float()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.project(images), dim=-1)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def init_trunk_from(self, spec: str | Path, cache_dir: str | Path | None = None) -> dict:
        """Load pretrained weights into the trunk: a local state-dict file or folder, or an
        open_clip / timm checkpoint in the local Hugging Face cache (`flame.towerinit` says which
        specs and key formats; nothing is downloaded). Raises one FlameError unless every trunk
        tensor is found with its shape."""
        from flame.towerinit import load_trunk

        return load_trunk(self.trunk, spec, self.config.tower, cache_dir)
