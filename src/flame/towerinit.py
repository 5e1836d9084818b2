"""Pretrained trunk weights (`flame train --tower-init SPEC`): where SPEC points, and how the
checkpoint's keys map onto a FLAME trunk. Everything is read locally; nothing is downloaded.

SPEC is one of
- `PATH`: a state-dict file (`.safetensors`, `.bin`, `.pt`, `.pth`, read weights-only by
  `flame.weights`), or a folder holding one under a hub file name (below);
- `hf-hub:ORG/NAME[/FILE][@REV]`: that repository in the local Hugging Face cache (the
  huggingface_hub layout `models--ORG--NAME/snapshots/REV/...`, found by huggingface_hub with
  `local_files_only`; `HF_HUB_CACHE` / `HF_HOME` say where the cache is);
- `open_clip:ARCH/TAG` (e.g. `open_clip:ViT-B-16/laion2b_s34b_b88k`): open_clip's pretrained
  tag, looked up in open_clip's registry, then read from the cache like `hf-hub:`;
- `timm:NAME[.TAG]` (e.g. `timm:vit_base_patch16_224.augreg_in21k`): timm's pretrained tag,
  the same way;
- `pretrained`: a `timm:NAME` tower's own pretrained weights (as `timm:NAME`).
Without a FILE, the hub file names are tried safetensors first, in the tower's own format
first: open_clip's `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`, timm's
`model.safetensors` / `pytorch_model.bin`.

Key formats. An open_clip trunk takes open_clip `VisionTransformer` keys (`conv1`,
`class_embedding`, `positional_embedding`, `ln_pre`, `transformer.resblocks.N`); a timm trunk
takes timm ViT keys (`patch_embed`, `cls_token`, `pos_embed`, `blocks.N`). From a full CLIP
checkpoint only `visual.*` is read (prefix stripped; open_clip's timm towers add `trunk.`), a
FLAME checkpoint's `visual.trunk.` works too, and `module.` (DDP) is stripped. The parts the
FLAME trunk does not have (final norm, pooling, projections, classifier heads) are ignored;
anything else must match one to one: every trunk tensor present, no unknown key, the same
shapes, else one FlameError line.
"""

from __future__ import annotations

from pathlib import Path

from flame.errors import FlameError
from flame.weights import load_state_dict

OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
TIMM_FILES = ("model.safetensors", "pytorch_model.bin")
SAFE_NAMES = {"open_clip_pytorch_model.bin": "open_clip_model.safetensors", "pytorch_model.bin": "model.safetensors"}
SPECS = "a file or folder, hf-hub:ORG/NAME[/FILE][@REV], open_clip:ARCH/TAG, timm:NAME[.TAG] or pretrained"

# format -> (the trunk's own key prefix, what the user reads, keys that mark it, keys the trunk lacks)
FORMATS = {
    "open_clip": ("vit.", "open_clip VisionTransformer", ("conv1.weight", "transformer.resblocks."),
                  ("ln_post", "proj", "attn_pool", "attn_pool_contrastive", "ln_contrastive", "head", "projector")),
    "timm": ("model.", "timm ViT", ("patch_embed.proj.weight", "blocks."),
             ("norm", "fc_norm", "head", "attn_pool", "projector")),
}


def tower_format(tower: str) -> str:
    return "timm" if tower.startswith("timm:") else "open_clip"


def weight_files(tower: str) -> tuple[str, ...]:
    """The hub file names to try for this tower, its own format first, safetensors first."""
    return TIMM_FILES + OPEN_CLIP_FILES if tower_format(tower) == "timm" else OPEN_CLIP_FILES + TIMM_FILES


# -- where a spec points ----------------------------------------------------------------------
def resolve(spec: str, tower: str, cache_dir: str | Path | None = None) -> Path:
    """The local checkpoint file `spec` names for `tower` (see the module docstring), or one FlameError."""
    kind, sep, rest = spec.partition(":")
    if spec == "pretrained":
        if tower_format(tower) != "timm":
            raise FlameError(f"--tower-init pretrained needs a timm:NAME tower (tower {tower!r} has no registry "
                             "weights); name the weights instead: " + SPECS)
        return _from_timm(tower.partition(":")[2], spec, tower, cache_dir)
    if sep and rest and kind == "hf-hub":
        return _from_hub(rest, spec, weight_files(tower), cache_dir)
    if sep and rest and kind == "open_clip":
        return _from_open_clip(rest, spec, tower, cache_dir)
    if sep and rest and kind == "timm":
        return _from_timm(rest, spec, tower, cache_dir)
    return _from_path(Path(spec).expanduser(), spec, weight_files(tower))


def _from_path(path: Path, spec: str, files: tuple[str, ...]) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in files:
            if (path / name).is_file():
                return path / name
        raise FlameError(f"--tower-init {spec}: the folder holds none of {', '.join(files)}")
    raise FlameError(f"--tower-init {spec} does not exist (expected {SPECS})")


def _from_hub(where: str, spec: str, files: tuple[str, ...], cache_dir) -> Path:
    """`ORG/NAME[/FILE][@REV]` from the local Hugging Face cache (never the network)."""
    from huggingface_hub import constants, hf_hub_download

    where, _, revision = where.partition("@")
    parts = where.strip("/").split("/")
    if len(parts) < 2 or not all(parts[:2]):
        raise FlameError(f"--tower-init {spec}: expected hf-hub:ORG/NAME[/FILE][@REV]")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    if filename:
        files = tuple(dict.fromkeys(n for n in (SAFE_NAMES.get(filename), filename) if n))
    for name in files:
        try:
            return Path(hf_hub_download(repo, name, revision=revision or None, cache_dir=cache_dir,
                                        local_files_only=True))
        except ValueError as e:  # huggingface_hub's HFValidationError: not a repo id
            raise FlameError(f"--tower-init {spec}: {repo!r} is not a Hugging Face repo id ({e})") from None
        except OSError:  # LocalEntryNotFoundError (not cached) and its kin
            continue
    cache = cache_dir or constants.HF_HUB_CACHE
    raise FlameError(
        f"--tower-init {spec}: {repo}{'@' + revision if revision else ''} has none of {', '.join(files)} in the "
        f"local Hugging Face cache {cache} (nothing is downloaded during training: fetch it first, e.g. "
        f"`hf download {repo}`, or pass the file's path)"
    )


def _from_open_clip(name: str, spec: str, tower: str, cache_dir) -> Path:
    import open_clip

    arch, _, tag = name.partition("/")
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    if not cfg:
        raise FlameError(f"--tower-init {spec}: not an open_clip pretrained ARCH/TAG (see open_clip.list_pretrained())")
    if not cfg.get("hf_hub"):
        raise FlameError(f"--tower-init {spec}: open_clip has no Hugging Face hub copy of these weights; pass the "
                         "downloaded file's path")
    return _from_hub(cfg["hf_hub"], spec, weight_files(tower), cache_dir)


def _from_timm(name: str, spec: str, tower: str, cache_dir) -> Path:
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except (RuntimeError, ValueError, KeyError):
        cfg = None
    hub = getattr(cfg, "hf_hub_id", None)
    if not hub:
        raise FlameError(f"--tower-init {spec}: timm has no Hugging Face hub weights for {name!r} "
                         "(see timm.list_models(pretrained=True))")
    filename = getattr(cfg, "hf_hub_filename", None)
    return _from_hub(f"{hub}/{filename}" if filename else hub, spec, weight_files(tower), cache_dir)


# -- how its keys map onto the trunk ------------------------------------------------------------
def visual_part(sd: dict) -> dict:
    """The image trunk's tensors of a checkpoint, under the library's own names: `module.`
    stripped, only `visual.*` of a full model, then a tower wrapper's `trunk.` and FLAME's inner
    `vit.` / `model.`."""
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if any(k.startswith("visual.") for k in sd):
        sd = {k.removeprefix("visual."): v for k, v in sd.items() if k.startswith("visual.")}
    out = {}
    for key, value in sd.items():
        key = key.removeprefix("trunk.")
        for inner in ("vit.", "model."):
            key = key.removeprefix(inner)
        out[key] = value
    return out


def checkpoint_format(keys) -> str | None:
    keys = list(keys)
    for fmt, (_, _, marks, _) in FORMATS.items():
        if marks[0] in keys and any(k.startswith(marks[1]) for k in keys):
            return fmt
    return None


def map_onto(sd: dict, own: dict, source: str | Path) -> dict:
    """`sd` (a checkpoint's state dict) renamed to the trunk's own keys (`own`: its state dict),
    checked one to one; one FlameError naming the first problem."""
    fmt = next((f for f, spec in FORMATS.items() if own and all(k.startswith(spec[0]) for k in own)), None)
    if fmt is None:
        raise FlameError(f"tower checkpoint {source}: the tower is neither an open_clip nor a timm trunk")
    inner, what, _, ignored = FORMATS[fmt]
    keys = visual_part(sd)
    found = checkpoint_format(keys)
    if found is None:
        raise FlameError(f"tower checkpoint {source} has no weights matching tower {what} (neither open_clip "
                         "VisionTransformer nor timm ViT keys)")
    if found != fmt:
        raise FlameError(f"tower checkpoint {source} holds {FORMATS[found][1]} weights but the tower is a {what}; "
                         f"choose a {'timm:NAME' if found == 'timm' else 'vit-*'} --tower")
    mapped, unexpected = {}, []
    for key, value in keys.items():
        if inner + key in own:
            mapped[inner + key] = value
        elif not any(key == p or key.startswith(p + ".") for p in ignored):
            unexpected.append(key)
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(own[key].shape):
            hint = " (another image size: pass the checkpoint's --image-size)" if "pos" in key else ""
            raise FlameError(f"tower checkpoint {source}: shape mismatch for {key.removeprefix(inner)}: checkpoint "
                             f"{tuple(value.shape)} vs tower {tuple(own[key].shape)}{hint}")
    missing = [k.removeprefix(inner) for k in own if k not in mapped]
    if missing or unexpected:
        parts = [f"{len(missing)} tower tensors missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unknown keys (e.g. {unexpected[0]})" if unexpected else ""]
        raise FlameError(f"tower checkpoint {source} is another architecture than the tower: "
                         f"{', '.join(p for p in parts if p)}")
    return mapped


def load_trunk(trunk, spec: str | Path, tower: str, cache_dir: str | Path | None = None) -> dict:
    """Initialise `trunk` (a FLAME trunk built for `tower`) from `spec`; returns
    {"path": the file read, "loaded": tensors loaded, "missing": []}."""
    path = resolve(str(spec), tower, cache_dir)
    mapped = map_onto(load_state_dict(path, "tower checkpoint"), trunk.state_dict(), path)
    trunk.load_state_dict(mapped, strict=True)
    return {"path": path, "loaded": len(mapped), "missing": []}
