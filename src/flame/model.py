"""FlameModel: the trained image side plus the description of the text side it matches.

A saved model is a folder with `model.safetensors` (tower, projector, logit scale/bias) and
`config.json` = {"format": "flame-model", "version": 1, "tower": TowerConfig, "text": the
store manifest's text side (LLM spec + fingerprint, layer, positions, prompt sets, facets,
k, dim), "image": {"size", "mean", "std"}}.

For users: `FlameModel.from_pretrained(run or checkpoint folder, or Hub repo ORG/NAME)`, then
`encode_image` (PIL images or a preprocessed batch), `encode_text` (through a lazily built
`flame.textenc.TextEncoder`, which loads the LLM only for texts not yet in its disk cache) and
`image_features` (pooled trunk features for linear probes). Sharing: `save_pretrained(folder)` adds
a README.md model card (`flame.modelcard`) to the two files; `push_to_hub(ORG/NAME)` uploads that
folder (`flame.hub`, which also decides what string is a repo id).

Evaluation preprocessing (`preprocess`, the CLIP/open_clip eval transform): convert to RGB,
resize the shorter side to S with bicubic interpolation (antialiased), centre-crop S x S,
scale to [0, 1], normalise with the tower's mean/std (OpenAI CLIP's for the open_clip towers).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from flame.errors import FlameError, first_line
from flame.fileio import write_atomic
from flame.hub import CARD, CONFIG, WEIGHTS
from flame.loss import INIT_LOGIT_BIAS, INIT_LOGIT_SCALE, clamp_logit_scale_
from flame.vision import ImageTower, TowerConfig

FORMAT = "flame-model"
VERSION = 1
TEXT_KEYS = ("llm", "layer", "positions", "prompt_sets", "facets", "k", "dim", "normalized", "max_caption_tokens")


def text_side(manifest: dict) -> dict:
    """The part of a store manifest that defines the text embedding space."""
    return {k: manifest[k] for k in TEXT_KEYS if k in manifest}


def resolve_model_folder(path: str | Path) -> Path:
    """A run folder -> its latest checkpoint holding a model (`flame.runfolder`'s one rule:
    `latest`, then the ledger, then the highest step); a checkpoint/model folder -> itself.
    Anything else is one FlameError naming what was expected."""
    from flame.hub import missing_weights, pickles_in
    from flame.runfolder import MODEL_FILES, latest_checkpoint

    path = Path(path).expanduser()
    if (path / CONFIG).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path, MODEL_FILES)
        if found is not None:
            return found
        names = [p.name for p in path.iterdir()]
        if pickles_in(names):
            raise missing_weights(str(path), names)
    what = "does not exist" if not path.exists() else "is not a FLAME model"
    raise FlameError(
        f"{path} {what}: expected a run folder (from flame train) or a checkpoint/model folder "
        f"holding {CONFIG} and {WEIGHTS}"
    )


def model_folder(path: str | Path, revision: str | None = None, hub_cache_dir: str | Path | None = None,
                 local_files_only: bool = False, token: str | bool | None = None) -> Path:
    """The folder holding the model `path` names: `resolve_model_folder` for a local path, the
    Hugging Face cache's snapshot for a Hub repo (which string is which: `flame.hub`)."""
    from flame.hub import download, hub_repo

    repo = hub_repo(path)
    if repo is None:
        if revision is not None:
            raise FlameError(f"{path}: revision={revision!r} applies to Hugging Face repos, not a local folder")
        return resolve_model_folder(path)
    if revision is not None and repo[1] is not None and revision != repo[1]:
        raise FlameError(f"{path}: names revision {repo[1]!r} but revision={revision!r} was given")
    return download(repo[0], revision or repo[1], cache_dir=hub_cache_dir, token=token,
                    local_files_only=local_files_only, spec=str(path))


def check_config(cfg: dict, where: str = CONFIG) -> tuple[TowerConfig, dict]:
    """A model config's tower and text side, checked in full before anything is built: the
    tower's types, options and cost (`TowerConfig.from_dict`, `flame.vision.check_tower_cost`),
    the text side's types (`check_text_side`), and that both sides share one width D."""
    from flame.vision import check_tower_cost

    if cfg.get("version") != VERSION:
        raise FlameError(f"{where}: unsupported FLAME model version {cfg.get('version')!r} (this reads {VERSION})")
    if "tower" not in cfg:
        raise FlameError(f"{where} is not a complete FLAME model config (no 'tower')")
    tower = TowerConfig.from_dict(cfg["tower"], f"{where}: tower")
    text = check_text_side(cfg.get("text"), f"{where}: text")
    if text.get("dim") is not None and text["dim"] != tower.embed_dim:
        raise FlameError(f"{where}: text.dim {text['dim']} differs from tower.embed_dim {tower.embed_dim}")
    check_tower_cost(tower)
    return tower, text


def _fail(where: str, what: str, value) -> None:
    raise FlameError(f"{where} must be {what}, not {value!r}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_text_side(text, where: str = "text") -> dict:
    """The "text" block's fields with the types `flame.textenc` relies on (absent ones stay absent)."""
    from flame.facets import POSITIONS

    text = {} if text is None else text
    if not isinstance(text, dict):
        _fail(where, "an object", text)
    llm = text.get("llm", {})
    if not isinstance(llm, dict) or not isinstance(llm.get("spec", ""), str):
        _fail(f"{where}.llm", 'an object {"spec": "...", "fingerprint": ...}', llm)
    if not isinstance(llm.get("fingerprint") or "", str):
        _fail(f"{where}.llm.fingerprint", "a string or null", llm.get("fingerprint"))
    layer = text.get("layer", [-2])
    layers = layer if isinstance(layer, list) else [layer]
    if not layers or not all(_is_int(v) and -1024 <= v <= 1024 for v in layers):
        _fail(f"{where}.layer", "a layer number or a list of them", layer)
    if text.get("positions", "restart") not in POSITIONS:
        _fail(f"{where}.positions", f"one of {', '.join(POSITIONS)}", text.get("positions"))
    for key, low, high in (("dim", 1, 65_536), ("k", 1, 10_000), ("max_caption_tokens", 1, 1 << 20)):
        if key in text and not (_is_int(text[key]) and low <= text[key] <= high):
            _fail(f"{where}.{key}", f"a whole number from {low} to {high:,}", text[key])
    if not isinstance(text.get("normalized", True), bool):
        _fail(f"{where}.normalized", "true or false", text["normalized"])
    facets = text.get("facets", [])
    if not isinstance(facets, list) or not all(isinstance(f, str) for f in facets):
        _fail(f"{where}.facets", "a list of strings", facets)
    sets = text.get("prompt_sets", [])
    if not isinstance(sets, list):
        _fail(f"{where}.prompt_sets", "a list", sets)
    for i, d in enumerate(sets):
        ok = isinstance(d, dict) and all(isinstance(d.get(k, ""), str) for k in ("name", "prefix", "sep"))
        facets = d.get("facets", []) if ok else None
        if not isinstance(facets, list) or not all(isinstance(f, str) for f in facets):
            _fail(f"{where}.prompt_sets[{i}]", 'an object {"name", "prefix", "facets": [strings]}', d)
    return text


def check_provenance(value, where: str = "provenance") -> dict | None:
    """config.json's optional "provenance" (a converted model's origin): text and numbers only."""
    if value is None:
        return None
    ok = isinstance(value, dict) and all(
        isinstance(k, str) and (v is None or isinstance(v, (str, int, float))) for k, v in value.items())
    if not ok:
        _fail(where, "an object of names and plain values", value)
    return dict(value)


def _to_rgb(image):
    """As every decode path sees a photo: EXIF orientation applied, 16-bit greyscale scaled."""
    from flame.data.images import as_rgb

    return as_rgb(image)


def inference_precision(device: torch.device | str) -> str:
    """The tower's inference precision: "fp32" on the CPU (results exactly as ever); on CUDA "bf16"
    (autocast) where the GPU computes bf16 natively, else "tf32" (fp32 with TF32 matmuls). Training
    and the stored vectors are unaffected; evaluation records it as the result's `precision`."""
    if torch.device(device).type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "tf32"


@contextmanager
def tower_precision(device: torch.device | str) -> Iterator[str]:
    """Run the block under `inference_precision(device)`; the global matmul setting is restored."""
    kind = inference_precision(device)
    if kind == "fp32":
        yield kind
        return
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 for what autocast leaves in fp32
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=kind == "bf16"):
            yield kind
    finally:
        torch.set_float32_matmul_precision(saved)


class FlameModel(nn.Module):
    def __init__(self, tower: TowerConfig, text: dict | None = None):
        super().__init__()
        self.tower_config = tower
        self.text = dict(text or {})
        self.visual = ImageTower(tower)
        self.logit_scale = nn.Parameter(torch.tensor(INIT_LOGIT_SCALE))
        self.logit_bias = nn.Parameter(torch.tensor(INIT_LOGIT_BIAS))
        self.source: Path | None = None  # the folder this model was loaded from
        self.provenance: dict | None = None  # where converted weights came from (config.json "provenance")
        self.text_options: dict = {}  # TextEncoder options (llm, device, force, cache_dir)
        self._text_encoder = None
        self._fingerprint: str | None = None

    # -- description --------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.visual.image_size

    @property
    def mean(self) -> tuple:
        return tuple(self.visual.trunk.mean)

    @property
    def std(self) -> tuple:
        return tuple(self.visual.trunk.std)

    def config(self) -> dict:
        cfg = {
            "format": FORMAT,
            "version": VERSION,
            "tower": self.tower_config.to_dict(),
            "text": self.text,
            "image": {"size": self.image_size, "mean": list(self.mean), "std": list(self.std)},
        }
        if self.provenance:
            cfg["provenance"] = dict(self.provenance)
        return cfg

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    @property
    def precision(self) -> str:
        """How `encode_image` / `image_features` run the tower here (`inference_precision`)."""
        return inference_precision(self.device)

    @property
    def fingerprint(self) -> str:
        """Identifies the weights (for image-vector caches): sha256 of model.safetensors when
        loaded from a folder, else of the state dict's bytes; 16 hex digits."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            weights = self.source / WEIGHTS if self.source is not None else None
            if weights is not None and weights.is_file():
                with open(weights, "rb") as f:
                    for block in iter(lambda: f.read(1 << 24), b""):
                        h.update(block)
            else:
                for name, t in sorted(self.state_dict().items()):
                    h.update(name.encode())
                    h.update(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    # -- compute ------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": self.visual(images), "logit_scale": self.logit_scale, "logit_bias": self.logit_bias}

    def transform(self):
        """The evaluation transform as a picklable torchvision pipeline (for DataLoader workers):
        PIL image -> float32 [3, S, S]. See the module docstring."""
        from torchvision import transforms as T

        return T.Compose([
            T.Lambda(_to_rgb),
            T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(self.image_size),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def preprocess(self, image) -> torch.Tensor:
        """One PIL image -> float32 [3, S, S], ready for encode_image."""
        return self.transform()(image)

    def _run(self, fn, images, batch_size: int, width: int) -> torch.Tensor:
        """Apply `fn` to PIL images (preprocessed one batch at a time, so memory stays bounded)
        or to a preprocessed [B,3,S,S] tensor, `batch_size` images per call on the model's
        device. Results come back float32 on the input tensor's device (CPU for PIL images)."""
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise FlameError(f"expected preprocessed images [B, 3, S, S], got {list(images.shape)}")
            out_device = images.device
            batches = (images[i : i + batch_size] for i in range(0, len(images), batch_size))
        else:
            if not isinstance(images, Sequence):
                images = [images]
            out_device = torch.device("cpu")
            transform = self.transform()
            batches = (
                torch.stack([transform(im) for im in images[i : i + batch_size]])
                for i in range(0, len(images), batch_size)
            )
        # the caller's autocast (open_clip/CLIP_benchmark code wraps calls in torch.autocast) is set
        # aside: the tower runs in the precision `flame eval` uses (`tower_precision`)
        with torch.autocast(self.device.type, enabled=False), tower_precision(self.device):
            parts = [fn(x.to(self.device, torch.float32)).float().to(out_device) for x in batches]
        return torch.cat(parts) if parts else torch.empty(0, width, device=out_device)

    @torch.no_grad()
    def encode_image(self, images, batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """PIL images (preprocessed here, see `preprocess`) or a preprocessed batch [B,3,S,S]
        -> L2-normalised float32 [B, D]; `normalize=False` (open_clip's flag): the pooled projection
        before the norm."""
        fn = self.visual if normalize else self.visual.project
        return self._run(fn, images, batch_size, self.tower_config.embed_dim)

    @torch.no_grad()
    def image_features(self, images, batch_size: int = 256) -> torch.Tensor:
        """Pooled trunk features before the projector, float32 [B, width] (what linear probes use)."""
        return self._run(self.visual.features, images, batch_size, self.visual.trunk.width)

    @property
    def text_encoder(self):
        """The `flame.textenc.TextEncoder` for this model's text side (built on first use)."""
        if self._text_encoder is None:
            from flame.textenc import TextEncoder

            self._text_encoder = TextEncoder(self.text, **self.text_options)
        return self._text_encoder

    def encode_text(self, texts: Sequence[str], prompts=None, progress: bool = False,
                    normalize: bool = True) -> torch.Tensor:
        """Texts -> L2-normalised float32 [N, D] in the image space. `prompts`: "raw" (short text,
        class prompts; the default), "short", "long" (long or multi-sentence text), or a PromptSet.
        `texts` may be a `flame.tokenizer.TextBatch` (`flame.get_tokenizer(model)(texts)`): its
        prompt set, unless `prompts` is given, and its device (`.to(device)`) for the result.
        `normalize` is open_clip's flag: a FLAME text vector is unit length by definition (the
        facet mean's L2 norm, FLAME.md section 6, with no projection after it), so both values
        return the same vectors. Cached on disk; the LLM is loaded only for texts not cached yet."""
        del normalize  # see the docstring: the text side's vectors are the normalised ones
        device = getattr(texts, "device", None)
        prompts = prompts or getattr(texts, "prompts", None) or "raw"
        vectors = self.text_encoder.encode(texts if isinstance(texts, str) else list(texts), prompts=prompts,
                                           progress=progress)
        return vectors if device is None else vectors.to(device)

    def clamp_(self) -> None:
        clamp_logit_scale_(self.logit_scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.set_grad_checkpointing(enable)

    # -- files --------------------------------------------------------------------------
    def save(self, folder: str | Path) -> None:
        """Write model.safetensors + config.json into `folder` (created)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS), metadata={"format": FORMAT})
        write_atomic(folder / CONFIG, json.dumps(self.config(), indent=2) + "\n")

    @staticmethod
    def read_config(folder: str | Path) -> dict:
        path = Path(folder) / CONFIG
        if not path.is_file():
            raise FlameError(f"{folder} is not a FLAME model folder (no {CONFIG})")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise FlameError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
            got = cfg.get("format") if isinstance(cfg, dict) else type(cfg).__name__
            raise FlameError(f"{path} is not a FLAME model config (format {got!r})")
        check_text_side(cfg.get("text"), f"{path}: text")
        return cfg

    @classmethod
    def from_config(cls, cfg: dict, where: str = CONFIG) -> FlameModel:
        """Build from a config dict, every field checked first (`check_config`)."""
        tower, text = check_config(cfg, where)
        return cls(tower, text)

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> FlameModel:
        from safetensors.torch import load_file

        from flame.hub import missing_weights, pickles_in

        weights = Path(folder) / WEIGHTS
        names = [p.name for p in Path(folder).iterdir()] if Path(folder).is_dir() else []
        if not weights.is_file() and pickles_in(names):  # before the config: pickles are refused as such
            raise missing_weights(str(folder), names)
        cfg = cls.read_config(folder)
        model = cls.from_config(cfg, str(Path(folder) / CONFIG))
        if not weights.is_file():
            raise missing_weights(str(folder), names)
        model.provenance = check_provenance(cfg.get("provenance"), f"{Path(folder) / CONFIG}: provenance")
        from safetensors import SafetensorError

        try:
            model.load_state_dict(load_file(str(weights), device=str(map_location)))
        except (RuntimeError, OSError, SafetensorError) as e:
            raise FlameError(f"{weights} does not match its config.json: {first_line(e)}") from e
        model.source = Path(folder)
        return model

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device | None = None,
        llm: str | None = None,
        llm_device: str | None = None,
        force_llm: bool = False,
        cache_dir: str | Path | None = None,
        revision: str | None = None,
        hub_cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
    ) -> FlameModel:
        """Load a model for use, in eval mode on `device` (default CPU; "auto": CUDA if present).

        `path`: a run folder (its latest checkpoint), a checkpoint/model folder, or a Hugging Face
        Hub repo: `hf-hub:ORG/NAME[@REVISION]` always, `ORG/NAME` when no such local path exists
        (an existing path always wins; see `flame.hub`). A repo is read through huggingface_hub:
        only config.json and model.safetensors are fetched, into its cache (`hub_cache_dir`, else
        HF_HUB_CACHE / HF_HOME), at `revision` (branch, tag or commit; default main); with
        HF_HUB_OFFLINE=1 or `local_files_only` only the cache is used. Safetensors only: a folder
        or repo holding a pickle instead is refused and nothing is executed. `revision` applies
        to Hub repos only. The text side's LLM is loaded only when `encode_text` meets an
        uncached text: `llm` overrides its spec, `llm_device` places it, `force_llm` accepts
        other weights, `cache_dir` holds the text cache (not the Hub cache)."""
        folder = model_folder(path, revision, hub_cache_dir=hub_cache_dir, local_files_only=local_files_only,
                              token=token)
        model = cls.load(folder)
        model.text_options = {"llm": llm, "device": llm_device, "force": force_llm, "cache_dir": cache_dir}
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return model.to(device or "cpu").eval()

    # -- sharing ------------------------------------------------------------------------
    def model_card(self, name: str | None = None, repo_id: str | None = None, evals: Sequence = ()) -> str:
        """README.md for this model (`flame.modelcard`): its run's train-config.json when it was
        loaded from a run's checkpoint, `evals`: `flame eval` result dicts or JSON files."""
        from flame.modelcard import model_card, read_evals, train_record

        results = [e for e in evals if isinstance(e, dict)] + read_evals([e for e in evals if not isinstance(e, dict)])
        name = name or (repo_id.split("/")[-1] if repo_id else None) or "FLAME model"
        return model_card(self.config(), name, repo=repo_id, train=train_record(self.source), results=results)

    def save_pretrained(self, folder: str | Path, repo_id: str | None = None, evals: Sequence = ()) -> Path:
        """Write a self-contained model folder: model.safetensors, config.json and a README.md
        model card (`model_card`). `folder` must be new, empty or such a folder (it is replaced
        file by file, each atomically); anything else is refused."""
        from safetensors.torch import save

        from flame.hub import check_target

        folder = check_target(Path(folder).expanduser())
        card = self.model_card(name=None if repo_id else folder.name, repo_id=repo_id, evals=evals)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / WEIGHTS, save(state, metadata={"format": FORMAT}))
        write_atomic(folder / CONFIG, json.dumps(self.config(), indent=2) + "\n")
        write_atomic(folder / CARD, card)
        return folder

    def push_to_hub(self, repo_id: str, private: bool | None = None, revision: str | None = None,
                    commit_message: str | None = None, token: str | bool | None = None, evals: Sequence = ()) -> str:
        """Upload `save_pretrained`'s folder to the Hub repo `repo_id` (created if needed; the
        branch `revision` too) as one commit through huggingface_hub's HfApi; returns its URL."""
        import tempfile

        from flame.hub import check_repo_id, upload

        check_repo_id(repo_id)
        with tempfile.TemporaryDirectory(prefix="flame-push-") as tmp:
            folder = self.save_pretrained(Path(tmp) / repo_id.split("/")[-1], repo_id=repo_id, evals=evals)
            return upload(folder, repo_id, private=private, revision=revision, commit_message=commit_message,
                          token=token)
