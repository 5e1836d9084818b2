"""CLIP_benchmark's own `eval` command on a FLAME model:

    python -m flame.integrations.clip_benchmark eval --model_type flame --model flame \\
        --pretrained RUN_OR_MODEL --dataset wds/NAME --dataset_root DIR ... [--flame_prompts SET]

Every argument of CLIP_benchmark's (1.6.2) `eval` command is taken and handed to its own command
line (`clip_benchmark.cli.main`), which builds its datasets and computes its metrics with its own
code. This module only adds the model type "flame" to CLIP_benchmark's loaders (`TYPE2FUNC`):
`load_flame` returns (model, transform, tokenizer) from `flame.create_model_and_transforms`
(`--pretrained`: a run folder, a checkpoint or model folder; `--model_cache_dir`: the text-vector
cache) and `flame.get_tokenizer`.

Texts (FLAME.md section 6): CLIP_benchmark tokenises class prompts and captions with the same
tokenizer, so the tokenizer takes its prompt set from the task of the run in progress: class
prompts (zero-shot classification) are read with the "raw" set; captions (retrieval, image-caption
selection) with `--flame_prompts` when given, else "long" for English when the model was trained
with a long set, else "raw". (`flame eval` also looks at the captions' mean length, which a
tokenizer called batch by batch cannot; pass `--flame_prompts raw` for short-caption sets.)

Three things this module handles so that CLIP_benchmark 1.6.2 runs unchanged:
- NumPy 2: its top-k `accuracy` calls float() on a one-element array, which NumPy 2 refuses; where
  NumPy does, that function (and the linear probe's reference to it) is replaced by `accuracy`
  below: the same count of samples whose label is among the k highest logits, over n.
- its captioning metric imports `pycocoevalcap` when the command line is imported; without it
  installed, that one task is replaced by `_no_captioning`, which says what to install.
- `--amp` (its default) makes CLIP_benchmark compute its own zero-shot logits under autocast
  (bfloat16 on CPU, float16 on CUDA). FLAME's vectors stay float32 (`FlameModel.encode_image`);
  with `--no_amp` the metrics are those of `flame eval` on the same model and images.

Its zero-shot classification and linear probe need scikit-learn, a dependency of CLIP_benchmark.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import types
from dataclasses import replace

from flame.errors import FlameError
from flame.factory import create_model_and_transforms
from flame.tokenizer import FlameTokenizer, TextBatch

MODEL_TYPE = "flame"
CLASS_PROMPT_TASKS = ("zeroshot_classification", "linear_probe")
PROG = "flame.integrations.clip_benchmark"

# what the run in progress is (set by `_task_aware` around each of CLIP_benchmark's runs)
_RUN: dict = {"task": "zeroshot_classification", "language": "en", "caption_prompts": None}


def caption_prompts(model, language: str, chosen: str | None) -> str:
    """The prompt set for captions (module docstring)."""
    if chosen:
        return chosen
    text = getattr(model, "text", None) or {}
    trained = {d.get("name") for d in text.get("prompt_sets") or [] if isinstance(d, dict)}
    trained |= {str(f).split("/")[0] for f in text.get("facets") or []}
    return "long" if language == "en" and "long" in trained else "raw"


class TaskTokenizer(FlameTokenizer):
    """A FlameTokenizer whose batches carry the prompt set of the task CLIP_benchmark is running."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def __call__(self, texts, context_length: int | None = None) -> TextBatch:
        if _RUN["task"] in CLASS_PROMPT_TASKS:
            prompts = "raw"
        else:
            prompts = caption_prompts(self.model, _RUN["language"], _RUN["caption_prompts"])
        return replace(super().__call__(texts, context_length), prompts=prompts)


def load_flame(model_name: str, pretrained: str, cache_dir: str | None = None, device="cuda"):
    """CLIP_benchmark's loader contract: (model, transform, tokenizer)."""
    model, _, transform = create_model_and_transforms(model_name, pretrained=pretrained, device=device,
                                                      cache_dir=cache_dir)
    return model, transform, TaskTokenizer(model)


def accuracy(output, target, topk=(1,)):
    """Top-k accuracy as CLIP_benchmark defines it (a list, one value per k): the share of the n
    samples whose label is among the k highest logits, counted exactly and divided in Python."""
    top = output.topk(max(topk), 1, True, True)[1]
    hit = top == target.view(-1, 1)
    return [int(hit[:, :k].any(dim=1).sum()) / len(target) for k in topk]


def _numpy_refuses_one_element_float() -> bool:
    import numpy as np

    try:
        float(np.ones(1))
    except TypeError:
        return True
    return False


def _no_captioning(**kwargs):
    raise FlameError("CLIP_benchmark's captioning task needs pycocoevalcap, which is not installed "
                     "(pip install pycocoevalcap)")


def _task_aware(run, default_task):
    """CLIP_benchmark's `run(args)`, with the task and language recorded for the tokenizer."""

    def wrapped(args):
        name = args.dataset[len("wds/"):] if args.dataset.startswith("wds/") else args.dataset
        _RUN["task"] = default_task(name) if args.task == "auto" else args.task
        _RUN["language"] = args.language
        return run(args)

    return wrapped


def prepare():
    """Import CLIP_benchmark's command line with the flame model type registered (module docstring)."""
    if importlib.util.find_spec("clip_benchmark") is None:
        raise FlameError("CLIP_benchmark is not installed (pip install clip-benchmark==1.6.2)")
    if importlib.util.find_spec("pycocoevalcap") is None and "clip_benchmark.metrics.captioning" not in sys.modules:
        import clip_benchmark.metrics as metrics

        placeholder = types.ModuleType("clip_benchmark.metrics.captioning")
        placeholder.evaluate = _no_captioning
        sys.modules[placeholder.__name__] = placeholder
        metrics.captioning = placeholder
    import clip_benchmark.cli as cli
    import clip_benchmark.models as models

    models.TYPE2FUNC[MODEL_TYPE] = load_flame
    if MODEL_TYPE not in models.MODEL_TYPES:
        models.MODEL_TYPES.append(MODEL_TYPE)  # the list --model_type's choices and load_clip check
    if _numpy_refuses_one_element_float():
        from clip_benchmark.metrics import linear_probe, zeroshot_classification

        zeroshot_classification.accuracy = accuracy
        linear_probe.accuracy = accuracy
    if not getattr(cli.run, "flame_task_aware", False):
        cli.run = _task_aware(cli.run, cli.get_dataset_default_task)
        cli.run.flame_task_aware = True
    return cli


def _own_options(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--flame_prompts", default=None)
    parser.add_argument("--flame_debug", action="store_true")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = _own_options(argv)
    saved = sys.argv
    try:
        cli = prepare()
        _RUN["caption_prompts"] = own.flame_prompts
        sys.argv = [PROG, *rest]  # CLIP_benchmark's parser reads sys.argv
        cli.main()
    except FlameError as e:
        if own.flame_debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
