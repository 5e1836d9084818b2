"""What `flame study` trains and scores: each part of the study names its arms (one trained model
each) and the evaluation splits it reads. An arm shared by two parts is trained once and scored on
the union of their splits; a part that is not run costs nothing."""

from __future__ import annotations

from dataclasses import dataclass

from flame.study.settings import StudySettings

SHORT = ("test", "compositional", "paraphrase", "zeroshot")
MULTILINGUAL = ("multilingual-fr", "multilingual-de", "multilingual-es")
LONG = ("long-late", "long-front")
NEGATIVES = ("hard-negatives",)
EVERY = (*SHORT, *MULTILINGUAL, *LONG, *NEGATIVES)


@dataclass(frozen=True)
class Store:
    """One `flame embed` pass: prompt sets on caption fields of the training set of `size` images."""

    name: str
    size: int
    prompts: tuple[str, ...]
    positions: str = "restart"


@dataclass(frozen=True)
class Arm:
    """One trained model. FLAME arms train against `store`'s facets (`facets` selects them); CLIP arms
    train open_clip's text tower on the `caption` field, cut at `context` tokens, with the image tower
    of FLAME arm `twin`."""

    name: str
    model: str  # "flame" | "clip"
    size: int
    store: Store
    facets: str = "all"
    caption: str = "txt"
    context: int | None = None
    twin: str | None = None
    label: str = ""


def stores(s: StudySettings) -> dict[str, Store]:
    big = s.largest
    out = {f"size-{n}": Store(f"size-{n}", n, ("short=txt", "long=long.txt")) for n in s.sizes}
    out["late"] = Store("late", big, ("long=late.txt",))
    out["causal"] = Store("causal", big, ("long=long.txt",), positions="causal")
    return out


def plan(s: StudySettings, parts: tuple[str, ...]) -> tuple[list[Arm], dict[str, tuple[str, ...]], dict]:
    """-> (the arms to train, in training order; arm -> the splits it is scored on; part -> its arms)."""
    st, big = stores(s), s.largest
    flame = {n: Arm(f"flame-{n}", "flame", n, st[f"size-{n}"], label=f"FLAME, {n} images") for n in s.sizes}
    clip = {n: Arm(f"clip-{n}", "clip", n, st[f"size-{n}"], twin=f"flame-{n}", label=f"CLIP, {n} images")
            for n in s.sizes}
    full = st[f"size-{big}"]
    late = Arm("flame-late", "flame", big, st["late"], label="FLAME, long set on the late captions")
    facet = {k: Arm(f"facets-{k}", "flame", big, full, facets=sel, label=label)
             for k, sel, label in (("raw", "0", "raw prompt (1 facet)"), ("short", "short", "short set (3)"),
                                   ("long", "long", "long set (7)"))}
    parts_arms = {
        "data": ([a for n in s.sizes for a in (flame[n], clip[n])], SHORT),
        "negatives": ([a for n in s.sizes for a in (flame[n], clip[n])], NEGATIVES),
        "long": ([late, Arm("clip-late", "clip", big, full, caption="late.txt", context=77, twin="flame-late",
                            label="CLIP, late captions cut at 77 tokens")], LONG),
        "facets": ([facet["raw"], facet["short"], facet["long"], flame[big]], EVERY),
        "attention": ([facet["long"], Arm("facets-causal", "flame", big, st["causal"],
                                          label="long set (7), one causal sequence")], EVERY),
    }
    arms: dict[str, Arm] = {}
    splits: dict[str, list[str]] = {}
    members: dict[str, list[str]] = {}
    for part in parts:
        part_arms, part_splits = parts_arms[part]
        members[part] = [a.name for a in part_arms]
        for a in part_arms:
            arms.setdefault(a.name, a)
            have = splits.setdefault(a.name, [])
            have.extend(x for x in part_splits if x not in have)
    # a CLIP arm borrows its twin's tower configuration: the twin trains first
    for a in list(arms.values()):
        if a.twin and a.twin not in arms:
            twin = next(x for p in parts_arms.values() for x in p[0] if x.name == a.twin)
            arms[twin.name] = twin
            splits.setdefault(twin.name, [])
    order = sorted(arms.values(), key=lambda a: (a.model == "clip", a.size, a.name))
    return order, {k: tuple(v) for k, v in splits.items()}, members
