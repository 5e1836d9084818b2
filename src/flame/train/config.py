"""`TrainConfig`: every `flame train` setting, declared once (type, default, help, check).

`flame.cli` builds the flags, their "(default ...)" text and `--config YAML` from these fields;
`flame.config.validate` converts and range-checks them. A default that depends on the data or
the device is a `None` field whose `shown` text says how it is derived; `flame.train.plan`
computes each of them, in one place.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from flame import config as settings
from flame.config import POSITIVE, at_least, setting
from flame.distributed import default_loader_workers
from flame.loss import DEFAULT_LOSS, LOSSES

DEFAULT_EPOCHS = 32.0  # when neither --steps nor --epochs is given
DEFAULT_POSITIVES = 6  # m, capped at the eligible facets
# settings that may change between a run and its resume without --force
RESUME_FREE = {"out", "resume", "force", "log_every", "save_every", "keep", "tensorboard", "progress", "config",
               "eval", "eval_every", "max_nonfinite", "report_to", "compile"}

DESCRIPTION = (
    "Train a FLAME image tower on webdataset image shards against an embedding store made by "
    "`flame embed` (the LLM is never loaded). Defaults follow the FLAME recipe (AdamW lr 5e-4, "
    "betas 0.9/0.95, wd 0.5, cosine with 2000 warm-up steps, m=6 positives). Launch with "
    "`torchrun --nproc_per_node N -m flame train ...` for several GPUs or machines."
)


def _is_logit_scale(v: str) -> bool:
    try:
        return v == "auto" or 1.0 <= float(v) <= 100.0
    except ValueError:
        return False


def _betas(v: tuple[float, float]) -> bool:
    return all(0 <= b < 1 for b in v)


def _crop(v: tuple[float, float]) -> bool:
    return 0 < v[0] <= v[1] <= 1


ONE = at_least(1)
REPORT_TO = ("jsonl", "tensorboard", "wandb")  # where --report-to may send the log records


def _sources(v: list[str]) -> bool:
    from flame.data.mix import parse_sources
    from flame.errors import FlameError

    try:
        return bool(parse_sources(v))
    except FlameError:
        return False


def _report_to(v: str) -> bool:
    names = [n.strip() for n in v.split(",")]
    return v.strip() == "none" or (all(n in REPORT_TO for n in names) and len(set(names)) == len(names))


@dataclass
class TrainConfig:
    # data
    data: list[str] = setting([], required=True, repeat=True, metavar="SHARDS", group="data", check=(
                                  _sources, "must each be SHARDS or SHARDS::WEIGHT with WEIGHT a positive number"),
                              help="image shards: brace pattern, glob, folder or files (keys must match the store); "
                                   "repeat it for several sources, SHARDS::WEIGHT for a weighted mix")
    embeddings: str = setting("", required=True, metavar="STORE", group="data",
                              help="embedding store folder from flame embed")
    out: str = setting("", required=True, metavar="RUN", group="data", help="run folder (checkpoints, logs)")
    workers: int = setting(factory=default_loader_workers, check=at_least(0), group="data",
                           shown="the rank's share of the CPUs less one, 1-16",
                           help="data-loader processes per rank")
    crop_scale: tuple[float, float] = setting((0.9, 1.0), check=(_crop, "must be LO HI with 0 < LO <= HI <= 1"),
                                              metavar=("LO", "HI"), group="data",
                                              help="random resized crop area range")
    # data mix and reporting (weighted --data sources, the resampled stream, --report-to)
    resampled: bool | None = setting(None, optional_value=True, metavar="BOOL", shown="on when a --data has a ::WEIGHT",
                                     group="data",
                                     help="draw shards with replacement: each sample's source by its --data ::WEIGHT "
                                          "(a share of the samples; 1 when not given), each source's shards "
                                          "uniformly; off = epochs without replacement over the joined data")
    train_num_samples: int | None = setting(None, check=ONE, metavar="N", shown="the data's usable samples",
                                            group="data", help="samples that make one epoch for --epochs (and for "
                                                               "the logged epoch of a resampled run)")
    report_to: str | None = setting(None, check=(_report_to, f"must be none or a comma list of {', '.join(REPORT_TO)}"),
                                    metavar="LIST", shown="jsonl,tensorboard", group="run",
                                    help="where log records go: jsonl (RUN/log.jsonl), tensorboard (RUN/tensorboard), "
                                         "wandb (Weights & Biases, pip install wandb; WANDB_MODE=offline works "
                                         "offline, files under RUN/wandb); --no-tensorboard drops tensorboard")
    # model
    tower: str = setting("vit-b-16", group="model", help="vit-tiny, vit-s-16, vit-b-16, vit-b-32, vit-l-14, timm:NAME")
    image_size: int | None = setting(None, check=ONE, shown="the tower's", group="model", help="input resolution")
    embed_dim: int | None = setting(None, check=ONE, shown="the store's", group="model",
                                    help="expected text dim D")
    k: int | None = setting(None, check=ONE, shown="the store's", group="model",
                            help="expected facets per sample K")
    proj_hidden: int | None = setting(None, check=ONE, shown="max(D, 4096)", group="model",
                                      help="projector hidden size H")
    pool_first: bool = setting(False, optional_value=True, metavar="BOOL", group="model",
                               help="mean-pool patch tokens before the projector (cheaper; default off = FLAME)")
    # pretrained and locked towers (flame.towerinit, train/freeze.py)
    tower_init: str | None = setting(None, metavar="SPEC", group="model",
                                     help="initialise the trunk from pretrained weights, read locally (never "
                                          "downloaded): a state-dict file or folder (open_clip or timm keys), "
                                          "hf-hub:ORG/NAME[/FILE][@REV] or open_clip:ARCH/TAG or timm:NAME.TAG from "
                                          "the local Hugging Face cache, or 'pretrained' (a timm:NAME tower's own)")
    lock_image: bool = setting(False, group="model",
                               help="freeze the trunk (LiT): only the projector and logit scale/bias train; frozen "
                                    "weights get no optimizer state, batch-norm statistics stay fixed")
    lock_image_unlocked: int = setting(0, check=at_least(0), metavar="N", group="model",
                                       help="leave the trunk's last N blocks (and final norm, if any) trainable "
                                            "(implies --lock-image)")
    grad_checkpointing: bool | None = setting(None, optional_value=True, metavar="BOOL", shown="off",
                                              group="model",
                                              help="activation checkpointing in the trunk: less memory, about a "
                                                   "quarter slower steps; for towers whose activations do not fit")
    # loss
    facets: str = setting("all", group="loss",
                          help="eligible positives: all, prompt sets (short,long) or indices (0,2-5)")
    positives: int | None = setting(None, check=ONE, aliases=("-m",), shown=f"min({DEFAULT_POSITIVES}, K)",
                                    group="loss", help="positives sampled per image")
    init_logit_scale: str = setting("10", check=(_is_logit_scale, "must be a number in [1, 100] or auto"),
                                    metavar="T|auto", group="loss",
                                    help="initial logit scale t (10 is the recipe); auto = 10 / sqrt(1 - c), c the "
                                         "mean pairwise cosine of stored vectors, for LLMs whose embeddings crowd "
                                         "into a cone")
    loss: str = setting(DEFAULT_LOSS, choices=tuple(LOSSES), group="loss",
                        help="mp-sigmoid (FLAME), mp-softmax (the FLAME release's multi-positive NCE), siglip or clip "
                             "(one positive per image: the first of the m drawn); negatives from every rank")
    # optimisation (FLAME recipe)
    batch_size: int = setting(384, check=ONE, group="optimisation", help="images per rank per micro-step")
    accum: int = setting(1, check=ONE, group="optimisation",
                         help="gradient accumulation micro-steps, exact: a step equals one on the accum-times larger "
                              "batch (images scored against the texts of the whole accumulated batch of every rank; "
                              "each rank holds world x accum x batch x P x D x 4 bytes of them, P = m or 1 for "
                              "siglip/clip: 1.2 GB for 8 x 4 x 384 x 6 x 4096; clip and mp-softmax also cache the "
                              "image embeddings in one extra forward without gradient)")
    steps: int | None = setting(None, check=ONE, group="optimisation", help="optimizer steps (or --epochs)")
    epochs: float | None = setting(None, check=POSITIVE, shown=f"{DEFAULT_EPOCHS:g} if no --steps",
                                   group="optimisation",
                                   help="passes over the joined data (epochs of --train-num-samples when given)")
    lr: float = setting(5e-4, check=POSITIVE, group="optimisation", help="peak learning rate")
    min_lr: float = setting(0.0, check=at_least(0), group="optimisation", help="cosine floor")
    warmup: int = setting(2000, check=at_least(0), group="optimisation",
                          help="linear warm-up steps (one not below the step count is cut to steps/5)")
    betas: tuple[float, float] = setting((0.9, 0.95), check=(_betas, "must each be in [0, 1)"), metavar=("B1", "B2"),
                                         group="optimisation", help="AdamW betas")
    eps: float = setting(1e-8, check=POSITIVE, group="optimisation", help="AdamW eps")
    weight_decay: float = setting(0.5, check=at_least(0), group="optimisation",
                                  help="on weight matrices only: not on norms, biases or logit params")
    precision: str = setting("auto", choices=("auto", "bf16", "fp32"), group="optimisation",
                             help="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = setting(False, group="optimisation",
                            help="torch.compile the image tower's training forward (inductor: a C++ compiler on the "
                                 "CPU, Triton on CUDA); the first step compiles (seconds for vit-tiny, minutes for "
                                 "ViT-B/16), later ones are faster where it pays (flame bench gpu measures both)")
    device: str = setting("auto", group="optimisation", help="auto, cpu, cuda")
    seed: int = setting(0, group="optimisation", help="seed of the model, the crops and the data order")
    deterministic: bool = setting(False, group="optimisation",
                                  help="deterministic algorithms (bit-exact resume on CPU)")
    # bookkeeping
    log_every: int = setting(10, check=ONE, group="run", help="steps between log lines")
    save_every: int = setting(1000, check=ONE, group="run", help="steps between checkpoints")
    keep: int = setting(2, check=at_least(0), group="run",
                        help="checkpoints kept, the most recently written (0 keeps all)")
    max_nonfinite: int = setting(20, check=ONE, group="run",
                                 help="stop after this many consecutive steps with a non-finite loss or gradient "
                                      "(each is skipped)")
    tensorboard: bool = setting(True, negate="--no-tensorboard", group="run",
                                help="no TensorBoard event files (the same as leaving tensorboard out of --report-to)")
    progress: bool = setting(True, negate="--no-progress", group="run", help="no progress bar")
    eval: str | None = setting(None, metavar="SUITE", group="run",
                               help="evaluate on this flame-eval suite file during training (rank 0; logged as "
                                    "eval/NAME/METRIC)")
    eval_every: int = setting(1000, check=ONE, group="run", help="steps between evaluations (and the last step)")
    resume: str | None = setting(None, optional_value="latest", metavar="CHECKPOINT", group="run",
                                 help="continue the run in --out (from RUN/latest or the named checkpoint folder); "
                                      "a run folder with no checkpoint yet starts from step 0, so requeued jobs can "
                                      "always pass it")
    force: bool = setting(False, group="run",
                          help="resume despite changed settings or data / start over in a non-empty --out (the old "
                               "checkpoints are deleted only after every setting has been checked)")

    def comparable(self) -> dict:
        """The settings a resume must match (train-config.json's "config")."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k not in RESUME_FREE}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Convert every setting to its type and check its range: one FlameError before anything
    is read, written or deleted (the API path; the command line does the same in flame.cli)."""
    return settings.validate(cfg)
