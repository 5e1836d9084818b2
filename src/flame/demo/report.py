"""`flame demo`'s outputs: OUT/metrics.json, OUT/timings.json, OUT/report.md and OUT/plots/*.png
(loss curves of both runs, recall per split, text queries with their top-5 images).

Written from a `DemoResult` (settings, metrics, timings, machine facts) and the files it points
to; this module never imports the pipeline that made them.
"""

from __future__ import annotations

import io
import json
import tarfile
import textwrap
from pathlib import Path

from flame.demo.facts import SPLITS, DemoPaths, DemoResult, load_clip, load_flame, summary_table
from flame.demo.settings import DemoSettings
from flame.fileio import write_atomic

PLOTS = ("loss.png", "recall.png", "queries.png")


def _log(path: Path) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                steps.append(r["step"])
                losses.append(r["loss"])
    return steps, losses


def plot_losses(paths: DemoPaths, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, (name, log, loss) in zip(axes, [
        ("FLAME", paths.flame_run / "log.jsonl", "multi-positive sigmoid loss"),
        ("CLIP baseline", paths.clip_run / "log.jsonl", "contrastive loss (ClipLoss)"),
    ]):
        steps, losses = _log(log)
        ax.plot(steps, losses, color="tab:blue" if name == "FLAME" else "tab:orange")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(loss)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_recall(metrics: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    splits = list(SPLITS)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), gridspec_kw={"width_ratios": [3, 3, 1]})
    x = np.arange(len(splits))
    for ax, metric, title in ((axes[0], "i2t_r1", "image -> text R@1"), (axes[1], "t2i_r1", "text -> image R@1")):
        for j, (model, colour) in enumerate((("flame", "tab:blue"), ("clip", "tab:orange"))):
            ax.bar(x + (j - 0.5) * 0.38, [metrics[model][s][metric] for s in splits], 0.38, label=model.upper(),
                   color=colour)
        ax.plot(x, [metrics["flame"][s]["chance_r1"] for s in splits], "k_", markersize=18, label="chance")
        ax.set_xticks(x, [s.replace("multilingual-", "ml-") for s in splits], rotation=20)
        ax.set_title(title)
        ax.set_ylim(0, 1)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    ax = axes[2]
    ax.bar([0, 1], [metrics["flame"]["zeroshot"]["top1"], metrics["clip"]["zeroshot"]["top1"]],
           color=["tab:blue", "tab:orange"])
    ax.axhline(metrics["flame"]["zeroshot"]["chance"], color="k", lw=1)
    ax.set_xticks([0, 1], ["FLAME", "CLIP"])
    ax.set_title("zero-shot top-1")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _tar_images(path: Path) -> dict[str, bytes]:
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if m.name.endswith(".png"):
                out[m.name[: -len(".png")]] = tar.extractfile(m).read()
    return out


def plot_queries(paths: DemoPaths, s: DemoSettings, path: Path, n_show: int = 5) -> None:
    """Text queries (one test scene in English, paraphrased and in three languages, plus a
    compositional caption) with each model's top-5 images; the queried image is framed green."""
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    from flame.evaluate import load_dataset
    from flame.evaluate.images import split_vectors

    flame = load_flame(paths, s.steps)
    clip_image, clip_text = load_clip(paths)
    queries = [("test", 0), ("paraphrase", 0), ("multilingual-fr", 0), ("multilingual-de", 0),
               ("multilingual-es", 0), ("test", 1), ("paraphrase", 1), ("compositional", 0)]
    rows = []
    cache = paths.image_cache
    for split, i in queries:
        ds = load_dataset(paths.data / "eval" / split, task="retrieval")
        items = ds.items("test")
        pngs = _tar_images(Path(items[0].shard))
        text = items[i].captions[0]
        for label, model, enc in (("FLAME", flame, flame.text_encoder), ("CLIP", clip_image, clip_text)):
            vec = split_vectors(model, ds, "test", "embed", workers=0, cache_dir=cache, progress=False).vectors
            q = enc.encode([text], prompts=s.eval_prompts)[0]
            top = (vec @ q).argsort(descending=True)[:n_show].tolist()
            rows.append((f"{label} · {split}", text, [(pngs[items[t].key], t == i) for t in top]))
    fig, axes = plt.subplots(len(rows), n_show + 1, figsize=(2.0 + 1.1 * n_show, 1.15 * len(rows)),
                             gridspec_kw={"width_ratios": [3.2] + [1] * n_show})
    for r, (label, text, images) in enumerate(rows):
        ax = axes[r][0]
        ax.axis("off")
        ax.text(0, 0.5, label + "\n" + "\n".join(textwrap.wrap(text, 38)), fontsize=6.5, va="center",
                color="tab:blue" if label.startswith("FLAME") else "tab:orange")
        for c, (png, hit) in enumerate(images, start=1):
            ax = axes[r][c]
            ax.imshow(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_color("limegreen" if hit else "lightgrey")
                spine.set_linewidth(3 if hit else 0.5)
    fig.tight_layout(pad=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: DemoResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    out, metrics, timings, skipped = result.paths.out, result.metrics, result.timings, result.skipped
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_atomic(out / "timings.json", json.dumps({"stages_s": timings, "skipped": skipped, "date": result.date,
                                                   "machine": result.machine}, indent=2) + "\n")
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    plot_losses(result.paths, plots / "loss.png")
    plot_recall(metrics, plots / "recall.png")
    plot_queries(result.paths, result.settings, plots / "queries.png")
    write_atomic(out / "report.md", report_text(result))


def report_text(result: DemoResult) -> str:
    """OUT/report.md: what ran, on what, how long, and the side-by-side table."""
    s, llm, timings, skipped = result.settings, result.llm, result.timings, result.skipped
    projector = "mean-pooled tokens, then the projector" if s.pool_first else "per-token projector"
    stage_line = ", ".join(f"{k} {v:.0f} s" + (" (cached)" if k in skipped else "") for k, v in timings.items())
    return f"""# flame demo report

{result.date} · {result.machine} · total {timings.get('total', 0) / 60:.1f} min ({stage_line})

Data: {s.train_images} training images of {s.combos} captioned combinations (64x64 scenes, seed {s.seed});
evaluation splits of {s.eval_size} images each (zero-shot: {s.zeroshot} images, 10 classes).
Text side: {s.llm}, layer {s.layer}, short set (3 facets) on the short caption and long set (7 facets)
on the long caption; LLM dtype {llm.get('dtype', 'float32')} chosen by timing on this machine
(fp32 {llm.get('float32', 0):.0f} tok/s, bf16 {llm.get('bfloat16', 0):.0f} tok/s). Evaluation texts use the
`{s.eval_prompts}` prompt set. Both models: {s.tower} at {s.image_size} px, {projector}
(hidden {s.proj_hidden}) to D, {s.steps} steps of batch {s.batch_size}, AdamW lr {s.lr:g}, warm-up {s.warmup},
weight decay {s.weight_decay:g}, the same image stream. FLAME's initial logit scale: {s.init_logit_scale}
(`flame train --init-logit-scale`). CLIP: open_clip TextTransformer
({s.clip_text['layers']} layers, width {s.clip_text['width']}) trained from scratch with ClipLoss on the
short captions.

{summary_table(result.metrics)}

R@k: share of queries whose match is among the top k (I2T: image queries, T2I: text queries);
`multilingual` is the mean over French, German and Spanish.

![loss curves](plots/loss.png)

![recall per split](plots/recall.png)

![text queries and their top-5 images](plots/queries.png)
"""
