"""`flame convert`: a checkpoint of the FLAME release (github MIV-XJTU/FLAME, an open_clip
fork) -> a FlameModel folder that `FlameModel.from_pretrained` loads.

What the release's checkpoint holds (a `torch.save` of the model's state dict, under
`state_dict` next to `epoch`/`optimizer` for a training checkpoint, keys prefixed `module.`
when saved under DDP):

- `visual.*`   an open_clip VisionTransformer. The release's image forward runs it up to
               the last block and keeps every token: `visual.ln_post.*` and `visual.proj`
               exist but are never used, so they are dropped here;
- `mm.{0,2,3}` the per-token projector Linear(width -> max(D, 4096)) -> GELU -> Linear(-> D)
               -> LayerNorm(D), D = 5120 (Mistral-Nemo's hidden size), then mean over the
               patch tokens and L2 norm: exactly this project's ImageTower;
- `logit_scale`, `logit_bias`;
- `text.*`     the frozen LLM, when saved with the model: ignored (the text side is
               described in config.json and loaded from the hub or a local copy).

Towers come from a registry of the release's configs (`RELEASE_CONFIGS`), or from a JSON
file in the release's own `model_configs` format (`--config path.json`). Checkpoints are
read with `torch.load(weights_only=True)`: a pickle that would run code is refused.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from flame.config import setting
from flame.errors import FlameError
from flame.release import RELEASE_LAYER, RELEASE_LLM, RELEASE_ORIGIN, release_text_side
from flame.vision import TowerConfig
from flame.weights import load_torch

DEFAULT_CONFIG = "FLAME-Mistral-Nemo-ViT-B-16"


@dataclass(frozen=True)
class ReleaseConfig:
    """The parts of a release model config that decide the weights' layout."""

    name: str
    image_size: int
    patch_size: int
    width: int
    layers: int
    head_width: int = 64
    mlp_ratio: float = 4.0
    projector_dim: int = 5120  # D
    llm: str = RELEASE_LLM
    layer: tuple[int, ...] = (RELEASE_LAYER,)
    tower: str | None = None  # a registered tower of this project with exactly this geometry

    @property
    def heads(self) -> int:
        return self.width // self.head_width

    @property
    def hidden(self) -> int:
        return max(self.projector_dim, 4096)  # the release's projector rule

    def geometry(self) -> tuple:
        return (self.image_size, self.patch_size, self.width, self.layers, self.projector_dim)

    def tower_config(self) -> TowerConfig:
        kwargs = {} if self.tower else {
            "patch_size": self.patch_size, "width": self.width, "layers": self.layers,
            "heads": self.heads, "mlp_ratio": self.mlp_ratio,
        }
        return TowerConfig(
            tower=self.tower or "vit-b-16",
            embed_dim=self.projector_dim,
            proj_hidden=self.hidden,
            pool_first=False,
            image_size=self.image_size,
            tower_kwargs=kwargs,
        )

    def text_side(self) -> dict:
        return release_text_side(self.projector_dim, llm=self.llm, layer=list(self.layer))


# the release's src/open_clip/model_configs/FLAME-*.json
RELEASE_CONFIGS: dict[str, ReleaseConfig] = {
    c.name: c
    for c in (
        ReleaseConfig("FLAME-Mistral-Nemo-ViT-B-16", 224, 16, 768, 12, tower="vit-b-16"),
        ReleaseConfig("FLAME-Mistral-Nemo-ViT-L-14", 224, 14, 1024, 24, tower="vit-l-14"),
    )
}

# vision_cfg options of the release's format that do not change the weights or the forward
# FLAME uses (all tokens, no final norm / projection), with the one value that keeps it so
# (_ANY: no effect here whatever the value).
_ANY = object()
_NEUTRAL_VISION = {
    "pool_type": "avg", "ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
    "pos_embed_type": "learnable", "act_kwargs": None, "norm_kwargs": None, "timm_model_name": None,
    "patch_dropout": _ANY, "final_ln_after_pool": _ANY, "output_tokens": _ANY,
}
_GEOMETRY_KEYS = ("image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio")


def config_from_release_json(data: dict, name: str) -> ReleaseConfig:
    """A release `model_configs/*.json` document -> ReleaseConfig; options this project's
    tower does not reproduce are refused."""
    vision, mm, text = (data.get(k) if isinstance(data, dict) else None for k in ("vision_cfg", "mm_cfg", "text_cfg"))
    if not isinstance(vision, dict) or not isinstance(mm, dict) or not isinstance(text or {}, dict):
        raise FlameError(f"config {name}: expected the release's format with vision_cfg and mm_cfg objects")
    text = text or {}
    if vision.get("pool_type", "tok") != "avg":  # open_clip's default pools the class token
        raise FlameError(f"config {name}: vision_cfg.pool_type must be \"avg\" (FLAME pools the patch tokens)")
    for key, value in vision.items():
        if key in _GEOMETRY_KEYS:
            continue
        if key not in _NEUTRAL_VISION:
            raise FlameError(f"config {name}: vision_cfg.{key} is not supported by the conversion")
        want = _NEUTRAL_VISION[key]
        if want is not _ANY and value != want:
            raise FlameError(
                f"config {name}: vision_cfg.{key}={json.dumps(value)} is not supported "
                f"(FLAME's tower needs {json.dumps(want)})"
            )
    if data.get("quick_gelu"):
        raise FlameError(f"config {name}: quick_gelu towers are not supported")
    if not mm.get("mm_projector", False) or int(mm.get("mlp_depth", 2)) != 2:
        raise FlameError(f"config {name}: needs the FLAME projector (mm_cfg.mm_projector true, mlp_depth 2)")
    width = int(vision.get("width", 768))
    if int(mm.get("width", width)) != width:
        raise FlameError(f"config {name}: mm_cfg.width {mm.get('width')} differs from vision_cfg.width {width}")
    try:
        layer = tuple(int(x) for x in str(text.get("layer", RELEASE_LAYER)).split("_"))
        return ReleaseConfig(
            name=name,
            image_size=int(vision.get("image_size", 224)),
            patch_size=int(vision.get("patch_size", 16)),
            width=width,
            layers=int(vision.get("layers", 12)),
            head_width=int(vision.get("head_width", 64)),
            mlp_ratio=float(vision.get("mlp_ratio", 4.0)),
            projector_dim=int(mm.get("projector_dim", 4096)),
            llm=str(text.get("llm_model_name") or RELEASE_LLM),
            layer=layer,
        )
    except (TypeError, ValueError) as e:
        raise FlameError(f"config {name}: bad value ({e})") from None


def resolve_config(spec: str) -> ReleaseConfig:
    """A registered release config name, or a path to a release-format JSON file."""
    if spec in RELEASE_CONFIGS:
        return RELEASE_CONFIGS[spec]
    path = Path(spec)
    if not path.is_file():
        raise FlameError(f"unknown --config {spec!r}: use one of {', '.join(RELEASE_CONFIGS)} or a release JSON file")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise FlameError(f"--config {path}: not valid JSON ({e.__class__.__name__})") from None
    return config_from_release_json(data, path.stem)


# ---- reading the checkpoint ---------------------------------------------------------------
def _describe(keys: list[str]) -> str:
    shown = ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")
    return f"{len(keys)} tensors: {shown}" if keys else "no tensors"


def read_release_state(path: str | Path) -> dict:
    """The release model's state dict from a checkpoint file: unwrapped from `state_dict`,
    `module.` prefix removed. A FLAME model (already converted) or anything else is refused
    with what was found."""
    import torch

    path = Path(path)
    if path.is_dir():
        if (path / "config.json").is_file() or (path / "model.safetensors").is_file():
            raise FlameError(f"{path} is already a FLAME model folder: load it with FlameModel.from_pretrained")
        raise FlameError(f"{path} is a folder; give the release's checkpoint file (e.g. epoch_32.pt)")
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as e:
            raise FlameError(f"cannot read {path} as safetensors ({e.__class__.__name__})") from None
    else:
        obj = load_torch(path, "checkpoint", mmap=True)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise FlameError(f"{path} holds a {type(obj).__name__}, not a state dict")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    keys = list(state)
    if any(k.startswith(("visual.trunk.", "visual.projector.")) for k in keys):
        raise FlameError(f"{path} is already a FLAME model state (visual.trunk.*): nothing to convert")
    if "visual.conv1.weight" not in state or "mm.0.weight" not in state:
        if "visual.conv1.weight" in state:
            what = "an open_clip image tower without the FLAME `mm` projector (a plain CLIP checkpoint?)"
        elif keys:
            what = _describe(keys)
        else:
            what = "no tensors (top-level keys: " + (", ".join(map(str, list(obj)[:6])) or "none") + ")"
        raise FlameError(
            f"{path} is neither a FLAME release checkpoint (visual.conv1.weight + mm.0.weight) "
            f"nor a FLAME model: found {what}"
        )
    return state


def _geometry_of(state: dict) -> tuple:
    conv = state["visual.conv1.weight"]
    patch, width = int(conv.shape[-1]), int(conv.shape[0])
    tokens = int(state["visual.positional_embedding"].shape[0]) if "visual.positional_embedding" in state else 1
    grid = math.isqrt(max(tokens - 1, 0))
    layers = len({k.split(".")[3] for k in state if k.startswith("visual.transformer.resblocks.")})
    dim = int(state["mm.2.weight"].shape[0]) if "mm.2.weight" in state else -1
    return (patch * grid, patch, width, layers, dim)


def map_release_state(state: dict) -> tuple[dict, dict[str, int]]:
    """Release keys -> FlameModel keys; returns (mapped, counts of what was left out)."""
    mapped: dict = {}
    dropped = {"head": 0, "llm": 0}
    unexpected = []
    for key, value in state.items():
        if key.startswith("visual."):
            rest = key[len("visual.") :]
            if rest == "proj" or rest.startswith("ln_post."):
                dropped["head"] += 1  # unused by the release's forward
            else:
                mapped["visual.trunk.vit." + rest] = value
        elif key.startswith("mm."):
            mapped["visual.projector." + key[len("mm.") :]] = value
        elif key in ("logit_scale", "logit_bias"):
            mapped[key] = value
        elif key.startswith("text."):
            dropped["llm"] += 1
        else:
            unexpected.append(key)
    if unexpected:
        raise FlameError(f"release checkpoint has parts this conversion does not know: {_describe(unexpected)}")
    return mapped, dropped


def check_against(mapped: dict, config: ReleaseConfig, state: dict) -> None:
    """Every tensor the config's FlameModel needs is there with its shape (checked on the
    meta device: no memory is spent on a wrong config)."""
    import torch

    from flame.model import FlameModel

    with torch.device("meta"):
        own = FlameModel(config.tower_config(), config.text_side()).state_dict()
    optional = {"logit_bias"}
    missing = [k for k in own if k not in mapped and k not in optional]
    extra = [k for k in mapped if k not in own]
    bad = [k for k in own if k in mapped and tuple(mapped[k].shape) != tuple(own[k].shape)]
    if not (missing or extra or bad):
        return
    if bad:
        k = bad[0]
        detail = f"{k} is {list(mapped[k].shape)} in the checkpoint, {list(own[k].shape)} for the config"
    elif missing:
        detail = f"the checkpoint lacks {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    else:
        detail = f"the checkpoint has {extra[0]}, which the config does not" + (
            f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        )
    geometry = _geometry_of(state)
    found = "image size {}, patch {}, width {}, {} blocks, projector to D={}".format(*geometry)
    match = next((n for n, c in RELEASE_CONFIGS.items() if c.geometry() == geometry), None)
    hint = f"; that is --config {match}" if match else ""
    raise FlameError(
        f"the checkpoint's tower does not match --config {config.name}: {detail} (checkpoint: {found}{hint})"
    )


# ---- conversion ---------------------------------------------------------------------------
def _check_replaceable(out: Path) -> None:
    """`--overwrite` replaces only a model folder: a folder holding nothing but the files
    `FlameModel.save` writes, with a FLAME model config.json. Anything else (a file, a folder
    of the user's, a store, a run) is refused before any work, and nothing is removed."""
    from flame.model import CONFIG, FORMAT, WEIGHTS

    refuse = f"--out {out} is not a FLAME model folder ({{}}); --overwrite only replaces a model folder, " \
             "choose another --out"
    if out.is_symlink() or not out.is_dir():
        raise FlameError(refuse.format("it is not a folder"))
    stray = sorted(p.name for p in out.iterdir() if p.name not in (CONFIG, WEIGHTS))
    if stray:
        raise FlameError(refuse.format(f"it holds {stray[0]!r}"))
    try:
        fmt = json.loads((out / CONFIG).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        fmt = None
    if fmt != FORMAT:
        raise FlameError(refuse.format(f"no {CONFIG} of format {FORMAT}"))


def provenance(checkpoint: Path, config: ReleaseConfig) -> dict:
    """What config.json records about the converted weights' origin (the model card shows it)."""
    import hashlib

    from flame import __version__

    h = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return {"origin": RELEASE_ORIGIN, "converted_by": f"flame convert (flame {__version__})",
            "release_config": config.name, "checkpoint": checkpoint.name, "checkpoint_sha256": h.hexdigest()}


def convert(checkpoint: str | Path, out: str | Path, config: str | ReleaseConfig = DEFAULT_CONFIG,
            overwrite: bool = False) -> dict:
    """Convert and write the FlameModel folder `out` atomically; returns a summary."""
    import torch

    from flame.fileio import replace
    from flame.model import FlameModel

    cfg = config if isinstance(config, ReleaseConfig) else resolve_config(config)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise FlameError(f"--out {out} already exists; use --overwrite to replace it")
        _check_replaceable(out)
    state = read_release_state(checkpoint)
    mapped, dropped = map_release_state(state)
    check_against(mapped, cfg, state)
    model = FlameModel(cfg.tower_config(), cfg.text_side())
    model.provenance = provenance(Path(checkpoint), cfg)
    own = model.state_dict()
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value.to(own[key].dtype))
    model.eval()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        replace(tmp, out)
    return {
        "config": cfg.name,
        "tensors": len(mapped),
        "params": sum(v.numel() for v in mapped.values()),
        "dropped_head": dropped["head"],
        "dropped_llm": dropped["llm"],
        "logit_bias": "logit_bias" in mapped,
        "llm": cfg.llm,
        "layer": list(cfg.layer),
    }


# ---- command ------------------------------------------------------------------------------
EPILOG = """\
release configs: {configs}
  or a JSON file in the release's own format (its src/open_clip/model_configs/*.json)

The text side written to config.json is the release's: {llm}, layer {layer},
"continue" positions, its raw/short/long prompt sets. The release records no fingerprint of
its LLM's weights, so none is recorded here: any local copy given as the LLM is trusted.

  flame convert epoch_32.pt --out flame-b16-cc3m
  python -c "from flame import FlameModel; m = FlameModel.from_pretrained('flame-b16-cc3m')"
"""


DESCRIPTION = "The FLAME release's open_clip checkpoint -> a FlameModel folder that FlameModel.from_pretrained loads."
EPILOG = EPILOG.format(configs=", ".join(RELEASE_CONFIGS), llm=RELEASE_LLM, layer=RELEASE_LAYER)


@dataclass
class Config:
    """`flame convert` settings."""

    CONFIG_ALIAS: ClassVar[str] = "release_config"  # `--config NAME|JSON` (not YAML) still names the release config

    checkpoint: str = setting("", positional=True, metavar="RELEASE_CHECKPOINT", required=True,
                              help="the release's .pt checkpoint file")
    out: str = setting("", metavar="MODEL_DIR", required=True, help="FlameModel folder to write")
    release_config: str = setting(DEFAULT_CONFIG, metavar="NAME|JSON",
                                  check=(lambda v: v in RELEASE_CONFIGS or Path(v).suffix == ".json",
                                         f"must be a release config ({', '.join(RELEASE_CONFIGS)}) or a .json file"),
                                  help="release model config the checkpoint was trained with, or a release JSON file "
                                       "(also accepted as --config NAME|JSON)")
    overwrite: bool = setting(False, help="replace an existing --out model folder (nothing else is ever removed)")


def main(cfg: Config) -> int:
    t0 = time.perf_counter()
    s = convert(cfg.checkpoint, cfg.out, cfg.release_config, overwrite=cfg.overwrite)
    bias = "" if s["logit_bias"] else "; no logit_bias in the checkpoint (default kept; unused at inference)"
    print(
        f"flame convert: {s['config']} -> {cfg.out}: {s['tensors']} tensors ({s['params'] / 1e6:,.1f}M values); "
        f"left out {s['dropped_head']} unused head tensors (visual.ln_post, visual.proj) and {s['dropped_llm']} "
        f"LLM tensors (text.*){bias}; text side {s['llm']} layer {','.join(map(str, s['layer']))}, continue positions, "
        f"no LLM fingerprint recorded (the release has none); {time.perf_counter() - t0:.1f} s"
    )
    return 0
