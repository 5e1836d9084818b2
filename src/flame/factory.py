"""open_clip's entry points for a FLAME model, so code written for open_clip runs by changing the import:

    model, preprocess_train, preprocess = flame.create_model_and_transforms("runs/demo/flame")
    tokenizer = flame.get_tokenizer(model)
    model.encode_image(preprocess(image)[None]); model.encode_text(tokenizer(["a dog", "a cat"]))

The name is what `FlameModel.from_pretrained` loads (a run folder, a checkpoint or model folder;
open_clip's "local-dir:" and "hf-hub:" prefixes are accepted and stripped). `pretrained`, when
given, names the weights instead (CLIP_benchmark passes `--model flame --pretrained RUN`).

The transforms are open_clip's two kinds with FLAME's settings: `preprocess_val` is the model's
evaluation transform (`FlameModel.transform`: what `flame eval` uses); `preprocess_train` is the
augmentation `flame train` applies (decode to RGB, a random-resized crop of scale `crop_scale`,
default (0.9, 1.0) as `flame train --crop-scale` and open_clip, bicubic, aspect 3/4..4/3),
as a torchvision pipeline on PIL images.
"""

from __future__ import annotations

from flame.errors import FlameError
from flame.tokenizer import DEFAULT_PROMPTS, FlameTokenizer

PREFIXES = ("local-dir:", "hf-hub:")


def _location(model_name: str, pretrained: str | None) -> str:
    name = str(pretrained) if pretrained else str(model_name)
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def train_transform(model, crop_scale: tuple[float, float] = (0.9, 1.0)):
    """PIL image -> float32 [3, S, S] with `flame train`'s random-resized crop (module docstring)."""
    from torchvision import transforms as T

    from flame.data.images import as_rgb

    lo, hi = crop_scale
    if not 0 < lo <= hi <= 1:
        raise FlameError(f"crop_scale must be LO HI with 0 < LO <= HI <= 1, not {crop_scale!r}")
    return T.Compose([
        T.Lambda(as_rgb),
        T.RandomResizedCrop(model.image_size, scale=(lo, hi), interpolation=T.InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(model.mean, model.std),
    ])


def create_model(model_name: str, pretrained: str | None = None, precision: str = "fp32",
                 device="cpu", cache_dir=None, **kwargs):
    """The FlameModel in eval mode on `device`. `precision`: FLAME computes its vectors in float32
    (as `flame eval` does), so only "fp32" is accepted. `cache_dir`: the text-vector cache;
    other keywords go to `FlameModel.from_pretrained` (llm, llm_device, force_llm, ...)."""
    from flame.model import FlameModel

    if precision != "fp32":
        raise FlameError(f"precision {precision!r}: a FLAME model computes its vectors in float32 (use 'fp32')")
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    return FlameModel.from_pretrained(_location(model_name, pretrained), device=device, **kwargs)


def create_model_and_transforms(model_name: str, pretrained: str | None = None, precision: str = "fp32",
                                device="cpu", cache_dir=None, crop_scale: tuple[float, float] = (0.9, 1.0),
                                **kwargs):
    """(model, preprocess_train, preprocess_val), as open_clip returns them (module docstring)."""
    model = create_model(model_name, pretrained, precision, device, cache_dir, **kwargs)
    return model, train_transform(model, crop_scale), model.transform()


def create_model_from_pretrained(model_name: str, pretrained: str | None = None, precision: str = "fp32",
                                 device="cpu", cache_dir=None, return_transform: bool = True, **kwargs):
    """(model, preprocess_val), or the model alone with `return_transform=False` (open_clip's)."""
    model = create_model(model_name, pretrained, precision, device, cache_dir, **kwargs)
    return (model, model.transform()) if return_transform else model


def get_tokenizer(model_name=None, prompts=DEFAULT_PROMPTS, **kwargs) -> FlameTokenizer:
    """A tokenizer whose output `FlameModel.encode_text` takes (`flame.tokenizer`). `model_name`
    (a FlameModel or its name) is accepted for open_clip's signature: a FLAME model's texts are
    read by its own LLM, so the tokenizer needs only the prompt set (default "raw", FLAME.md
    section 6's set for short text and class prompts; "long" for long captions). open_clip's
    other keywords (context_length, cache_dir) are accepted and unused."""
    del model_name, kwargs
    return FlameTokenizer(prompts)
