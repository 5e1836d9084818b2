"""Which scene every image of every split shows (`plan`), from `ScenesConfig` and one seed."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace

from flame.data.scenes.captions import short_caption
from flame.data.scenes.longcaps import SWAPS, hard_negative
from flame.data.scenes.vocabulary import (
    ATMOSPHERES,
    CATEGORIES,
    COLOURS,
    HELDOUT,
    PATTERNS,
    POSITIONS,
    SIZES,
    VERSION,
    Scene,
)
from flame.errors import FlameError


@dataclass
class ScenesConfig:
    """How big the generated set is. `combos` captioned combinations in training; each
    evaluation split has `eval_size` images with distinct captions."""

    seed: int = 0
    train: int = 3000
    combos: int = 300
    eval_size: int = 100
    zeroshot: int = 200
    image_size: int = 64
    study: bool = False  # also the long-caption and hard-negative splits of `flame study`
    # the test split's scenes come from the first `test_combos` combinations (None: all of them). The
    # combinations of a smaller set are a prefix of a larger one's, so sets of several sizes with the
    # same `test_combos` share every evaluation split (`flame study`'s data-efficiency curves)
    test_combos: int | None = None

    def to_dict(self) -> dict:
        d = {**asdict(self), "version": VERSION}
        for name in ("study", "test_combos"):  # a demo set's settings (and cache) are what they were before
            if not d[name]:
                del d[name]
        return d


QUICK = ScenesConfig(train=640, combos=64, eval_size=48, zeroshot=60)


def _allowed(cat: str, colour: str) -> bool:
    return (cat, colour) not in HELDOUT


def _random_scene(rng: random.Random, main: str | None = None, heldout_main: bool = False) -> Scene:
    cats, cols = list(CATEGORIES), list(COLOURS)
    main = main or rng.choice(cats)
    if heldout_main:
        colour = next(c for k, c in sorted(HELDOUT) if k == main)
    else:
        colour = rng.choice([c for c in cols if _allowed(main, c)])
    minor = rng.choice([c for c in cats if c != main])
    minor_colour = rng.choice([c for c in cols if _allowed(minor, c) and c != colour])
    return Scene(main, colour, rng.choice(list(PATTERNS)), rng.choice(list(SIZES)), rng.choice(list(POSITIONS)),
                 minor, minor_colour, rng.choice(list(ATMOSPHERES)))


def _pairs(rng: random.Random, n: int) -> list[Scene]:
    """n combinations with distinct short captions, made in pairs: a random scene, then the same
    scene with another main category (same colour, pattern, size, position, minor object, weather)."""
    cats, out, seen, tries = list(CATEGORIES), [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise FlameError(f"cannot draw {n} combinations with distinct captions")
        base = _random_scene(rng, main=cats[len(out) // 2 % len(cats)])
        other = [c for c in cats if c not in (base.main, base.minor) and _allowed(c, base.colour)]
        pair = [base, replace(base, main=rng.choice(other))]
        caps = {short_caption(x) for x in pair}
        if not caps & seen:
            seen |= caps
            out.extend(pair)
    return out[:n]


def _distinct(rng: random.Random, n: int, make: Callable[[int], Scene], avoid: Iterable[str] = ()) -> list[Scene]:
    """n scenes with pairwise different short captions (and none in `avoid`)."""
    seen, out = set(avoid), []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 200 * n + 1000:
            raise FlameError(f"cannot draw {n} scenes with distinct captions; lower the split size")
        s = make(len(out))
        cap = short_caption(s)
        if cap not in seen:
            seen.add(cap)
            out.append(s)
    return out


@dataclass
class Plan:
    train: list[Scene]  # one entry per training image
    combos: list[Scene]
    test: list[Scene]
    compositional: list[Scene]
    zeroshot: list[Scene]
    long: list[Scene] = field(default_factory=list)  # study only: groups of 4 sharing a long caption's opening
    negatives: list[tuple[Scene, str]] = field(default_factory=list)  # study only: per test scene, swapped + how


def _long_split(rng: random.Random, test: list[Scene], n: int) -> list[Scene]:
    """n scenes in groups of 4 that share the opening of their long caption (main object, colour,
    pattern, size, weather) and differ in the details only: the minor object, its colour and the
    relation. Truncating the details away leaves a group's captions identical."""
    cats, cols = list(CATEGORIES), list(COLOURS)
    out: list[Scene] = []
    seen: set[Scene] = set()
    for base in test:
        group, tries = [base], 0
        while len(group) < 4 and tries < 1000:
            tries += 1
            minor = rng.choice([c for c in cats if c != base.main])
            colour = rng.choice([c for c in cols if _allowed(minor, c) and c != base.colour])
            s = replace(base, minor=minor, minor_colour=colour, position=rng.choice(list(POSITIONS)))
            if s not in group and s not in seen:
                group.append(s)
        seen.update(group)
        out.extend(group)
        if len(out) >= n:
            break
    return out[:n]


def plan(config: ScenesConfig) -> Plan:
    """Which scene every image of every split shows (no pixels yet)."""
    pool = config.combos if config.test_combos is None else config.test_combos
    if not config.eval_size <= pool <= config.combos:
        raise FlameError(f"eval_size {config.eval_size} needs at least as many test combinations ({pool}), "
                         f"and those at most the {config.combos} training combinations")
    rng = random.Random(f"scenes/{config.seed}/combos")
    cats = list(CATEGORIES)
    combos = _pairs(rng, config.combos)
    # Training order: the two combinations of a pair (same scene, another main category) sit side
    # by side, so most batches hold pairs that only the objects' shapes tell apart; without them
    # colour and weather alone separate a batch's captions and the tower never learns the shapes.
    order = random.Random(f"scenes/{config.seed}/order")
    pairs = [combos[i : i + 2] for i in range(0, len(combos), 2)]
    train: list[Scene] = []
    while len(train) < config.train:
        order.shuffle(pairs)
        train.extend(s for pair in pairs for s in pair)
    train = train[: config.train]
    pick = random.Random(f"scenes/{config.seed}/test")
    test = pick.sample(combos[:pool], config.eval_size)
    comp_rng = random.Random(f"scenes/{config.seed}/compositional")
    compositional = _distinct(comp_rng, config.eval_size,
                              lambda i: _random_scene(comp_rng, main=cats[i % len(cats)], heldout_main=True))
    zs_rng = random.Random(f"scenes/{config.seed}/zeroshot")
    zeroshot = [_random_scene(zs_rng, main=cats[i % len(cats)]) for i in range(config.zeroshot)]
    if not config.study:
        return Plan(train, combos, test, compositional, zeroshot)
    long = _long_split(random.Random(f"scenes/{config.seed}/long"), test, config.eval_size)
    neg_rng = random.Random(f"scenes/{config.seed}/negatives")
    negatives = [(hard_negative(s, swap), swap) for s in test for swap in [neg_rng.choice(SWAPS)]]
    return Plan(train, combos, test, compositional, zeroshot, long, negatives)
