"""`flame embed`'s settings: one dataclass, each flag declared once (the command line, its
"(default ...)" help, `--config FILE` and the checks come from it: `flame.cli`, `flame.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flame.config import POSITIVE, setting
from flame.errors import FlameError
from flame.llm import DEFAULT_LLM
from flame.prompts import DEFAULT_MAX_CAPTION_TOKENS
from flame.release import LAYOUTS
from flame.store import DTYPES

EPILOG = """\
caption sources (--prompts SET=SOURCE):
  SET     a built-in prompt set (raw: 1 facet, short: 3, long: 7) or a YAML/JSON prompt-set file
  SOURCE  EXT          text of the shard member KEY.EXT, e.g. txt
          TABLE:COLUMN column COLUMN of a table given with --captions, found by the TABLE
                       name (--captions NAME=FILE) or the file's stem (--captions FILE)

  the paper's 11 embeddings per image (1 raw + 3 short + 7 long):
    flame embed --data 'cc3m/{00000..00575}.tar' --captions recap=cc3m_recaptions.json \\
        --prompts raw=txt short=recap:short_caption long=recap:long_caption \\
        --llm mistralai/Mistral-Nemo-Instruct-2407 --layer 39 --out cc3m-emb

  on 8 GPUs (one process per GPU; add --nnodes/--node_rank/--rdzv-endpoint for several machines):
    torchrun --nproc_per_node 8 -m flame embed ...same flags...

bad input: a shard that fails (unreadable tar, an error while encoding it, NaN/inf vectors,
no sample with a caption) is reported and skipped (exit 2 at the end; a rerun retries it, last;
STORE/attempts/ records it); a sample whose caption is missing (no KEY.EXT member, key not in the table, null
value) is left out of its shard's rows and counted (--on-missing skip), or stops the run
(--on-missing error); an empty caption is embedded as empty text and counted (--on-empty embed),
left out (skip) or stops the run (error).
"""

RELEASE = "FLAME release import (instead of running an LLM)"


def parse_layer(text: str) -> list[int]:
    """`-2` or `38,39` -> the decoder blocks (1-based, negative from the top)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FlameError(
            f"--layer: expected an integer or a comma-separated list (e.g. -2 or 38,39), not {text!r}"
        ) from None


@dataclass
class Config:
    """Everything `flame embed` is asked to do (flags, `--config FILE` or the API)."""

    # inputs
    data: list[str] = setting([], required=True, metavar="SHARDS", group="inputs",
                              help="webdataset tar shards: brace pattern ('cc3m/{00000..00575}.tar'), glob, "
                                   "folder or list")
    captions: list[str] = setting([], metavar="[NAME=]FILE", group="inputs",
                                  help="caption tables keyed by __key__ (.json list, .jsonl, .csv, .parquet); "
                                       "NAME defaults to the file's stem")
    prompts: list[str] = setting(["raw=txt"], metavar="SET=SOURCE", group="inputs",
                                 help="prompt set -> caption source, e.g. raw=txt short=recap:short "
                                      "long=recap:long; see below")
    key_field: str = setting("__key__", group="inputs", help="key field of the caption tables")
    on_missing: str = setting("skip", choices=("skip", "error"), group="inputs",
                              help="a sample without a caption for some set: skip = leave it out and count it, "
                                   "error = stop")
    on_empty: str = setting("embed", choices=("embed", "skip", "error"), group="inputs",
                            help="an empty caption: embed = embed it as empty text and count it, skip = leave "
                                 "the sample out, error = stop")
    # model
    llm: str = setting(DEFAULT_LLM, group="model", help="hub id, local model folder, .gguf file or built-in name")
    layer: str = setting("-2", group="model", shown="-2, the paper's 39 of 40",
                         help="decoder block(s) whose output is the embedding, 1-based, negative from the top; "
                              "a comma list averages several")
    positions: str = setting("restart", choices=("restart", "continue", "causal"), group="model",
                             help="facet position ids: restart (exact = separate passes), continue "
                                  "(the released FLAME code) or causal (continue without the facet mask: "
                                  "later facets see earlier ones; an ablation)")
    llm_dtype: str = setting("auto", choices=("auto", "float32", "bfloat16", "float16"), group="model",
                             help="LLM weights/compute dtype (auto: bf16 on GPU, fp32 on CPU)")
    device: str = setting("auto", group="model",
                          help="cpu, cuda, cuda:1 ... (auto: cuda:LOCAL_RANK if there is a GPU, else cpu)")
    devices: str | None = setting(None, metavar="LIST", group="model",
                                  help="comma list of local devices (cuda:0,cuda:1): one worker per device from "
                                       "one command")
    batch_tokens: int | None = setting(None, check=POSITIVE, group="model", shown="4096 on CPU, 65536 on GPU",
                                       help="padded tokens per forward batch")
    max_batch: int | None = setting(None, check=POSITIVE, group="model",
                                    shown="64 on CPU, batch-tokens / 16 on GPU: the token budget binds",
                                    help="sequences per forward batch at most")
    max_caption_tokens: int = setting(DEFAULT_MAX_CAPTION_TOKENS, metavar="N", group="model",
                                      help="longer captions are cut to N tokens and counted as truncated")
    chunk: int = setting(1024, check=POSITIVE, group="model",
                         help="unique captions handed to the encoder at once (bounds memory)")
    prefetch: bool = setting(True, group="model", negate="--no-prefetch",
                             help="tokenize and build batches in series with the model, not on a prefetch thread "
                                  "while it runs")
    # output
    out: Path | None = setting(None, required=True, metavar="STORE", group="output",
                               help="the embedding store folder")
    dtype: str = setting("fp16", choices=tuple(DTYPES), group="output",
                         help="stored dtype: fp16, or int8 with one float32 scale per vector")
    overwrite: bool = setting(False, group="output",
                              help="replace an existing store made with other settings (deletes its shards)")
    dry_run: bool = setting(False, group="output",
                            help="count samples, project the store size and the time on this hardware; "
                                 "write nothing")
    # the release's stored vectors instead of an LLM
    import_release: Path | None = setting(None, metavar="ROOT", group=RELEASE,
                                          help="copy the release's per-image embedding files ROOT/DIR/KEY.pth "
                                               "(11 x 5120 fp16) for the samples of --data into the store, "
                                               "bit-exact in fp16; no LLM is loaded")
    release_layout: str = setting("auto", choices=("auto", *LAYOUTS), group=RELEASE,
                                  help="folder of a key's file: cc3m = the key's first 5 characters, yfcc15m = "
                                       "the key up to its first '_', auto = whichever exists")

    @property
    def layers(self) -> list[int]:
        return parse_layer(self.layer)

    def check(self) -> None:
        """Rules between settings (every field is already converted and range-checked)."""
        self.layers  # noqa: B018 (raises the one-line error for a bad --layer)
        if self.import_release is not None:
            if self.prompts != ["raw=txt"] or self.captions:
                raise FlameError(
                    "--import-release reads the release's stored vectors: --prompts/--captions do not apply"
                )
            if self.dry_run:
                raise FlameError("--dry-run is not supported with --import-release")
