"""`flame eval --suite paper`'s report: the paper's tables (`published.TABLES`) with this model's row
added, as Markdown, JSON and a plot. The model's numbers are its results (fractions, as
CLIP_benchmark writes them) shown as percentages; a benchmark that was not run is an empty cell.
The results of benchmarks no table has a column for are listed after the tables with their metrics."""

from __future__ import annotations

import json
from pathlib import Path

from flame.evaluate.benchmark.published import TABLES, Column
from flame.fileio import write_atomic

MODEL_ROW = "this model"


def _pick(results: list[dict], col: Column) -> dict | None:
    """The result a column reads: the one with `col.where`'s fields, else the first with its metrics."""
    for r in results:
        if all(r.get(k) == v for k, v in col.where.items()) and all(m in r.get("metrics", {}) for m in col.metrics):
            return r
    return None


def model_value(results: dict[str, list[dict]], col: Column):
    """This model's cell: percentages, a tuple for several metrics, None when not run (or None)."""
    r = _pick(results.get(col.benchmark, []), col)
    if r is None:
        return None
    vals = tuple(None if r["metrics"][m] is None else round(100 * float(r["metrics"][m]), 2) for m in col.metrics)
    return vals if len(vals) > 1 else vals[0]


def tables(results: dict[str, list[dict]], model: str) -> list[dict]:
    """Every published table with this model's row last (the JSON form of the report)."""
    out = []
    for t in TABLES:
        rows = [{"model": r.model, "data": r.data, "values": list(r.values), "published": True} for r in t.rows]
        mine = [model_value(results, c) for c in t.columns]
        rows.append({"model": MODEL_ROW, "data": model, "values": mine, "published": False})
        out.append({"title": t.title, "source": t.source, "note": t.note,
                    "columns": [{"label": c.label, "benchmark": c.benchmark, "metrics": list(c.metrics),
                                 **({"where": c.where} if c.where else {})} for c in t.columns],
                    "rows": rows})
    return out


def others(results: dict[str, list[dict]]) -> list[dict]:
    """The results of benchmarks no table has a column for (e.g. multilingual ImageNet); the rest
    of a tabled benchmark's results (XM3600's 36 languages) stay in `results` only."""
    tabled = {c.benchmark for t in TABLES for c in t.columns}
    return [{"benchmark": name, **r} for name, rs in results.items() if name not in tabled for r in rs]


def _number(x: float) -> str:
    """As published: one decimal, or two where the number has them (51.72, 16.67)."""
    s = f"{x:.2f}"
    return s[:-1] if s.endswith("0") else s


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (tuple, list)):
        return " / ".join("-" if x is None else _number(x) for x in v)
    return v if isinstance(v, str) else _number(v)


def markdown(report: dict) -> str:
    lines = [f"# FLAME paper benchmarks: {report['model']}", "",
             f"Data root: `{report['data_root']}`. Benchmarks run: {', '.join(report['ran']) or 'none'}."]
    if report["skipped"]:
        lines.append(f"Not found there (skipped): {', '.join(s['benchmark'] for s in report['skipped'])}.")
    for t in report["tables"]:
        lines += ["", f"## {t['title']}", "", "| model | trained on | " + " | ".join(c["label"] for c in t["columns"])
                  + " |", "|---|---|" + "---|" * len(t["columns"])]
        for r in t["rows"]:
            name = r["model"] if r["published"] else f"**{r['model']}**"
            lines.append(f"| {name} | {r['data']} | " + " | ".join(_cell(v) for v in r["values"]) + " |")
        lines += ["", f"Source: {t['source']}. {t['note']}".rstrip()]
    if report["other"]:
        lines += ["", "## Other results", "", "| benchmark | dataset | language | metric | value (%) |",
                  "|---|---|---|---|---|"]
        for r in report["other"]:
            for k, v in r.get("metrics", {}).items():
                shown = "" if v is None else f"{100 * float(v):.2f}"
                lines.append(f"| {r.get('benchmark', '')} | {r.get('dataset', '')} | {r.get('language', '')} | {k} | "
                             f"{shown} |")
    return "\n".join(lines) + "\n"


def build(results: dict[str, list[dict]], model: str, data_root: str, skipped: list[dict]) -> dict:
    return {"suite": "paper", "model": model, "data_root": data_root, "ran": list(results), "skipped": skipped,
            "tables": tables(results, model), "other": others(results),
            "results": [r for rs in results.values() for r in rs]}


def paths(output: str | Path) -> dict[str, Path]:
    """Where the report goes: --output FILE (the JSON) with FILE.md and FILE.png beside it."""
    out = Path(output)
    return {"json": out, "md": out.with_suffix(".md"), "png": out.with_suffix(".png")}


def write(report: dict, output: str | Path, plot_it: bool = True) -> dict[str, Path]:
    where = paths(output)
    where["json"].parent.mkdir(parents=True, exist_ok=True)
    write_atomic(where["json"], json.dumps(report, indent=2) + "\n")
    write_atomic(where["md"], markdown(report))
    if plot_it:
        plot(report, where["png"])
    return where


def _series(t: dict) -> tuple[list[str], dict[str, list]]:
    """A table's bars: one label per (column, metric) where this model has a number, one series per
    row with numbers there."""
    mine = t["rows"][-1]["values"]
    labels, picks = [], []
    for j, (c, v) in enumerate(zip(t["columns"], mine)):
        for k, m in enumerate(c["metrics"]):
            x = v[k] if isinstance(v, (tuple, list)) else v
            if x is not None:
                labels.append(c["label"] + (f" {'I2T' if 'text_retrieval' in m else 'T2I'}" if len(c["metrics"]) > 1
                                            else ""))
                picks.append((j, k))
    series = {}
    for r in t["rows"]:
        vals = []
        for j, k in picks:
            v = r["values"][j]
            v = v[k] if isinstance(v, (tuple, list)) else v
            vals.append(v if isinstance(v, (int, float)) else None)
        if any(v is not None for v in vals):
            series[f"{r['model']} ({r['data']})" if r["published"] else MODEL_ROW] = vals
    return labels, series


def plot(report: dict, path: Path) -> None:
    """One panel per table this model has numbers in: grouped bars, this model beside the published rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(t, *_series(t)) for t in report["tables"]]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(max(1, len(panels)), 1, figsize=(10, 3.2 * max(1, len(panels))), squeeze=False)
    for ax, (t, labels, series) in zip(axes[:, 0], panels):
        width = 0.8 / len(series)
        for s, (name, vals) in enumerate(series.items()):
            xs = [i + s * width for i, v in enumerate(vals) if v is not None]
            ax.bar(xs, [v for v in vals if v is not None], width, label=name,
                   color="black" if name == MODEL_ROW else None)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, fontsize=7)
        ax.set_title(t["title"], fontsize=9)
        ax.set_ylabel("%")
        ax.legend(fontsize=6)
    if not panels:
        axes[0, 0].text(0.5, 0.5, "no benchmark with published numbers was run", ha="center")
        axes[0, 0].axis("off")
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
