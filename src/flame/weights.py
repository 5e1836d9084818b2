"""One weights-only loader: every `torch.load` of a file from outside goes through here.

A `.pt`/`.pth` file is a pickle, and unpickling can run code; `torch.load(weights_only=True)`
refuses anything but tensors and plain data. This module adds what each caller needs
around it: one-line FlameErrors that name the file and say why, a memory-mapped read with a
plain-read fallback for old non-zip files, and `.safetensors` files read the same way.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

from flame.errors import FlameError


def _why(e: BaseException) -> str:
    """torch's unpickler errors are long: the part that says what the file asked for."""
    text = str(e)
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if m:
        return f"it asks to import {m.group(1)}"
    m = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)
    line = m.group(1) if m else next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{e.__class__.__name__}: {line[:160]}" if line else e.__class__.__name__


def load_torch(path: str | Path, what: str, mmap: bool = False):
    """torch.load(weights_only=True) with one-line FlameErrors: a pickle that would run code
    is refused (never executed), an unreadable file is named. `mmap` maps tensors instead
    of reading them (falls back to a plain read for old, non-zip files)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FlameError(f"{what} {path} does not exist")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle of ours at all: garbage or damaged
            raise FlameError(f"cannot read {what} {path} as a PyTorch file ({_why(e)})") from None
        raise FlameError(
            f"refused to load {what} {path}: it is not plain tensor data and would run code when unpickled "
            f"({_why(e)}); only weights_only files are read"
        ) from None
    except Exception as e:  # zip / EOF / format errors all mean the same thing to the user
        raise FlameError(f"cannot read {what} {path} as a PyTorch file ({_why(e)})") from None


def load_state_dict(path: str | Path, what: str) -> dict:
    """A state dict from `.safetensors` or a weights-only `.pt`/`.pth` (unwrapping the usual
    `state_dict` / `model` / `module` containers), or one FlameError."""
    path = Path(path)
    if not path.is_file():
        raise FlameError(f"{what} {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:
            raise FlameError(f"cannot read {what} {path}: {_why(e)}") from None
    else:
        sd = load_torch(path, what)
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise FlameError(f"{what} {path} does not hold a state dict")
    return sd
