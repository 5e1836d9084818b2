"""`flame study`'s report: OUT/study.json (every arm's metrics, the settings, the stage times),
OUT/study.md (one table per part, as measured) and OUT/plots/*.png. It receives the results and
never runs anything."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from flame.demo.facts import machine, now
from flame.fileio import write_atomic
from flame.study.arms import LONG, MULTILINGUAL, SHORT, Arm
from flame.study.settings import StudySettings

RETRIEVAL = ("i2t_r1", "t2i_r1")


def write_report(out: Path, s: StudySettings, parts: tuple[str, ...], arms: list[Arm], members: dict,
                 results: dict, timings: dict) -> dict:
    summary = {"date": now(), "machine": machine(), "settings": asdict(s), "parts": list(parts),
               "arms": {a.name: {**asdict(a), "store": asdict(a.store)} for a in arms},
               "members": members, "results": results, "timings": timings}
    write_atomic(out / "study.json", json.dumps(summary, indent=2) + "\n")
    (out / "plots").mkdir(parents=True, exist_ok=True)
    if "data" in parts:
        plot_sizes(s, results, out / "plots" / "data_efficiency.png")
    write_atomic(out / "study.md", report_text(summary, s))
    return summary


def _f(v) -> str:
    return "" if v is None else f"{v:.3f}"


def _retrieval_row(label: str, m: dict, splits) -> str:
    cells = [f"{_f(m[x]['i2t_r1'])} / {_f(m[x]['t2i_r1'])}" if x != "zeroshot" else _f(m[x]["top1"]) for x in splits]
    return f"| {label} | " + " | ".join(cells) + " |"


def _header(splits) -> list[str]:
    names = [("zero-shot top-1" if x == "zeroshot" else f"{x} R@1 I2T / T2I") for x in splits]
    return ["| arm | " + " | ".join(names) + " |", "|---" * (len(splits) + 1) + "|"]


def data_table(s: StudySettings, results: dict) -> list[str]:
    rows = ["| images | combinations | " + " | ".join(f"FLAME {x}" for x in SHORT) + " | "
            + " | ".join(f"CLIP {x}" for x in SHORT) + " |", "|---" * (2 + 2 * len(SHORT)) + "|"]
    for n in s.sizes:
        f, c = results.get(f"flame-{n}"), results.get(f"clip-{n}")
        if not (f and c):
            continue
        cell = (lambda m, x: _f(m[x]["top1"]) if x == "zeroshot" else _f(m[x]["i2t_r1"]))
        rows.append(f"| {n} | {n // s.images_per_combo} | " + " | ".join(cell(f, x) for x in SHORT) + " | "
                    + " | ".join(cell(c, x) for x in SHORT) + " |")
    return rows


def crossing(s: StudySettings, results: dict, split: str = "test") -> str:
    """Where FLAME's in-distribution image->text R@1 stops being ahead of CLIP's (or that it never is)."""
    margins = [(n, results[f"flame-{n}"][split]["i2t_r1"] - results[f"clip-{n}"][split]["i2t_r1"])
               for n in s.sizes if f"flame-{n}" in results and f"clip-{n}" in results]
    if not margins:
        return ""
    text = ", ".join(f"{n}: {m:+.3f}" for n, m in margins)
    ahead = [n for n, m in margins if m > 0]
    if not ahead:
        verdict = "CLIP is ahead at every size"
    elif len(ahead) == len(margins):
        verdict = "FLAME is ahead at every size"
    else:
        verdict = f"FLAME is ahead at {', '.join(map(str, ahead))} images"
    return f"FLAME minus CLIP, {split} image->text R@1, by training-set size: {text} ({verdict})."


def report_text(summary: dict, s: StudySettings) -> str:
    results, members, arms = summary["results"], summary["members"], summary["arms"]
    b = summary["settings"]["base"]
    lines = [f"# flame study ({summary['date']}, {summary['machine']})", "",
             f"Every arm: {b['tower']} at {b['image_size']} px, {b['steps']} steps of batch {b['batch_size']}, "
             f"LLM {b['llm']} (layer {b['layer']}); evaluation splits of {b['eval_size']} images "
             f"(zero-shot: {b['zeroshot']} images), shared by every arm. Stage times: total "
             f"{summary['timings'].get('total', 0) / 60:.1f} min.", ""]
    if "data" in members:
        lines += ["## Data efficiency (image->text R@1; zero-shot top-1)", "", *data_table(s, results), "",
                  crossing(s, results), "", "![data efficiency](plots/data_efficiency.png)", ""]
    if "negatives" in members:
        lines += ["## Hard negatives (the caption against the same caption with two attributes swapped)", "",
                  "| arm | accuracy | colours swapped | objects swapped |", "|---|---|---|---|"]
        for name in members["negatives"]:
            m = results[name]["hard-negatives"]
            lines.append(f"| {arms[name]['label']} | {_f(m['accuracy'])} | {_f(m.get('colours'))} | "
                         f"{_f(m.get('objects'))} |")
        lines += ["", "chance 0.500", ""]
    if "long" in members:
        lines += ["## Long captions (details after token 77, and the same captions with them in front)", "",
                  *_header(LONG)]
        lines += [_retrieval_row(arms[n]["label"], results[n], LONG) for n in members["long"]] + [""]
    for part, title in (("facets", "What the facets buy"), ("attention", "Facet-decoupled attention against causal")):
        if part in members:
            splits = ("test", "compositional", "paraphrase", "zeroshot", *LONG)
            lines += [f"## {title}", "", *_header(splits)]
            lines += [_retrieval_row(arms[n]["label"], results[n], splits) for n in members[part]]
            lines += ["", "| arm | " + " | ".join(f"{x} I2T" for x in MULTILINGUAL) + " | hard negatives |",
                      "|---" * (len(MULTILINGUAL) + 2) + "|"]
            lines += [f"| {arms[n]['label']} | " + " | ".join(_f(results[n][x]["i2t_r1"]) for x in MULTILINGUAL)
                      + f" | {_f(results[n]['hard-negatives']['accuracy'])} |" for n in members[part]] + [""]
    return "\n".join(lines) + "\n"


def plot_sizes(s: StudySettings, results: dict, path: Path) -> None:
    """Recall and zero-shot top-1 against the training-set size, both models."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [n for n in s.sizes if f"flame-{n}" in results and f"clip-{n}" in results]
    fig, axes = plt.subplots(1, len(SHORT), figsize=(4 * len(SHORT), 3.4))
    for ax, split in zip(axes, SHORT):
        key = "top1" if split == "zeroshot" else "i2t_r1"
        for model, style in (("flame", "o-"), ("clip", "s--")):
            ax.plot(sizes, [results[f"{model}-{n}"][split][key] for n in sizes], style, label=model.upper())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_title(f"{split} ({'top-1' if key == 'top1' else 'I2T R@1'})")
        ax.set_xlabel("training images")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
