"""Retrieval in bounded memory (issue 18 item 11, issue 16 item 5): the chunked computation equals
the unchunked one exactly, ties included, and a 100k-caption x 576 evaluation stays within a fixed
bound of working memory (peak RSS, measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from flame.evaluate.metrics import retrieval_metrics, retrieval_ranks


def unchunked(images: torch.Tensor, texts: torch.Tensor, owner: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """The whole score matrix at once, torch.topk per k (what 8a825a2 computed, in one block)."""
    img, txt = F.normalize(images.float(), dim=-1), F.normalize(texts.float(), dim=-1)
    own = torch.tensor(owner)
    s = txt @ img.T
    out = {}
    for k in ks:
        top_i = s.topk(min(k, len(img)), dim=1).indices
        top_t = s.T.contiguous().topk(min(k, len(txt)), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = (top_i == own[:, None]).any(1).float().mean().item()
        out[f"text_retrieval_recall@{k}"] = (own[top_t] == torch.arange(len(img))[:, None]).any(1).float().mean().item()
    return out


def half_vectors(n: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """Rows with exactly four entries of +-0.5: unit norm exactly, and every dot product a multiple
    of 0.25, so scores are exact in float32 whatever the summation order (a GEMM's rounding depends
    on the block's shape; here it cannot) and ties abound."""
    x = torch.zeros(n, dim)
    for r in range(n):
        cols = torch.randperm(dim, generator=g)[:4]
        x[r, cols] = torch.where(torch.rand(4, generator=g) < 0.5, -0.5, 0.5)
    return x


def tied_set(seed: int, n_img: int = 60, dim: int = 8):
    """Captions and images whose scores tie often: duplicated images, duplicated captions, and
    distinct vectors with equal scores."""
    g = torch.Generator().manual_seed(seed)
    images = half_vectors(n_img, dim, g)
    images[10:20] = images[0:10]  # duplicated images
    owner = [i for i in range(n_img) for _ in range(int(torch.randint(1, 4, (1,), generator=g)))]
    texts = half_vectors(len(owner), dim, g)
    near = torch.rand(len(owner), generator=g) < 0.6  # most captions: their image's vector
    texts[near] = images[torch.tensor(owner)[near]]
    texts[1::7] = texts[0::7][: len(texts[1::7])]  # duplicated captions
    return images, texts, owner


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_chunked_equals_unchunked_exactly_with_ties(seed):
    images, texts, owner = tied_set(seed)
    s = F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).T
    assert torch.equal(s * 4, (s * 4).round())  # exact scores
    top_ties = sum(int((r == r.max()).sum()) > 1 for r in s)
    assert top_ties > len(s) // 4  # the set really is full of ties, at the top of the ranking too
    ref = unchunked(images, texts, owner)
    assert 0.0 < ref["image_retrieval_recall@1"] < 1.0
    for chunk in (1, 3, 7, 64, None):
        assert retrieval_metrics(images, texts, owner, chunk=chunk, device="cpu") == ref, chunk
    # a budget smaller than one row still works (one row at a time), and numpy inputs too
    assert retrieval_metrics(images.numpy(), texts.numpy(), owner, budget=1, device="cpu") == ref
    # in place: no copy, same answer, and the caller's vectors come back normalised
    img, txt = images.clone(), texts.clone()
    assert retrieval_metrics(img, txt, owner, chunk=5, device="cpu", overwrite=True) == ref
    assert torch.allclose(txt.norm(dim=1), torch.ones(len(txt)))


def brute_ties_and_argmax(images: torch.Tensor, texts: torch.Tensor, owner: list[int]):
    """Per direction: queries whose best score occurs twice or more, and recall@1 by argmax (the
    first maximal index), row by row in plain Python over the whole score matrix."""
    s = (F.normalize(texts.float(), dim=-1) @ F.normalize(images.float(), dim=-1).T).tolist()
    cols = [list(c) for c in zip(*s)]
    ties = {"image_retrieval": sum(r.count(max(r)) > 1 for r in s),
            "text_retrieval": sum(c.count(max(c)) > 1 for c in cols)}
    r1 = {"image_retrieval_recall@1": sum(r.index(max(r)) == owner[t] for t, r in enumerate(s)) / len(s),
          "text_retrieval_recall@1": sum(owner[c.index(max(c))] == i for i, c in enumerate(cols)) / len(cols)}
    return ties, r1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_are_counted_in_the_chunks_and_argmax_gives_the_tie_to_the_lower_index(seed):
    images, texts, owner = tied_set(seed)
    ties, r1 = brute_ties_and_argmax(images, texts, owner)
    assert ties["image_retrieval"] > 0 and ties["text_retrieval"] > 0
    ref = unchunked(images, texts, owner)
    for chunk in (1, 3, 64, None):
        for ks in ((1,), (1, 5, 10), (5,)):
            m, t = retrieval_ranks(images, texts, owner, ks, chunk=chunk, device="cpu", ties=True)
            assert t == ties, (chunk, ks)
            assert m == {k: v for k, v in ref.items() if int(k.split("@")[1]) in ks}  # ties change nothing else
        m, t = retrieval_ranks(images, texts, owner, (1,), chunk=chunk, device="cpu", ties=True, first_max=True)
        assert t == ties and m == pytest.approx(r1, abs=1e-7), chunk
    assert retrieval_ranks(images, texts, owner, device="cpu")[1] is None  # not asked: not counted
    one = retrieval_ranks(images[:1], images[:1].repeat(3, 1), [0, 0, 0], (1,), device="cpu", ties=True)[1]
    assert one == {"image_retrieval": 0, "text_retrieval": 1}  # one candidate: no tie; 3 equal captions: a tie


def test_text_rows_pick_captions_without_changing_the_answer():
    images, texts, owner = tied_set(3)
    rows = torch.tensor([t for t in range(len(texts)) if t % 4 != 1])
    ref = unchunked(images, texts[rows], [owner[t] for t in rows])
    got = retrieval_metrics(images, texts, [owner[t] for t in rows], chunk=4, device="cpu", text_rows=rows,
                            overwrite=True)
    assert got == ref


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_equals_the_unchunked_computation_on_cuda():
    images, texts, owner = tied_set(4, n_img=500, dim=16)  # exact scores on the GPU too
    ref = unchunked(images.cuda(), texts.cuda(), owner)
    assert retrieval_metrics(images, texts, owner, chunk=37, device="cuda") == ref


MEASURE = textwrap.dedent("""
    import inspect, json, sys, torch
    from flame.evaluate.metrics import retrieval_metrics
    n_text, n_img, dim = (int(a) for a in sys.argv[1:4])
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(n_img, dim, generator=g)
    owner = torch.arange(n_text) % n_img
    texts = images[owner] + 2.0 * torch.randn(n_text, dim, generator=g)
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    known = inspect.signature(retrieval_metrics).parameters  # 8a825a2 has neither
    extra = {k: v for k, v in (("device", "cpu"), ("overwrite", True)) if k in known}
    def run(images, texts, owner):
        if sys.argv[4:] == ["ties"]:  # the benchmarks' path: ties counted in the same blocks
            from flame.evaluate.metrics import retrieval_ranks
            return retrieval_ranks(images, texts, owner, **extra, ties=True)[0]
        return retrieval_metrics(images, texts, owner, **extra)
    run(images[:10].clone(), texts[:100].clone(), owner[:100] % 10)  # the code's pages mapped before the count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak (VmHWM) restarts here: making the inputs is not counted
    base = status("VmRSS")
    m = run(images, texts, owner)
    peak = status("VmHWM")
    print(json.dumps({"base": base, "peak": peak, "metrics": m}))
""")


def measure(n_text: int, n_img: int, dim: int, *mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", MEASURE, str(n_text), str(n_img), str(dim), *mode], capture_output=True,
                         text=True, env=os.environ, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("mode", [(), ("ties",)])
def test_100k_captions_at_576_stay_within_a_fixed_working_memory_bound(mode):
    """Inputs: 100k caption vectors x 576 (220 MiB) and 1,000 images. What retrieval adds on top
    of them (peak RSS - RSS with the inputs) stays under 128 MiB: the 64 MiB score block, a 16 MiB
    normalisation slice and small per-query arrays (measured: 84-89 MiB). 8a825a2 added a normalised
    copy of the captions (220 MiB), a 1,024 x 100k score block (390 MiB) and its top-k buffers.
    Counting ties (the benchmarks' path) adds one bool per query and stays under the same bound.
    The least of two runs: a larger working set shows in both, while one run in CI once read 128.06
    MiB where every run here reads 84-89 (the code's pages are mapped before the count)."""
    runs = [measure(100_000, 1_000, 576, *mode) for _ in range(2)]
    added = min(r["peak"] - r["base"] for r in runs) / 2**20
    r = runs[0]
    assert added < 128, f"retrieval added {added:.0f} MiB"
    assert 0.0 < r["metrics"]["image_retrieval_recall@10"] <= 1.0


def test_chunked_equals_unchunked_on_random_vectors():
    """No ties: the chunked ranks equal the unchunked ones for any chunk (8a825a2's 1,024-row
    blocks included)."""
    g = torch.Generator().manual_seed(9)
    images = torch.randn(300, 24, generator=g)
    owner = [i for i in range(300) for _ in range(1 + i % 3)]
    texts = images[owner] + 1.5 * torch.randn(len(owner), 24, generator=g)
    ref = unchunked(images, texts, owner)
    assert 0.1 < ref["image_retrieval_recall@1"] < 0.9
    for chunk in (1, 50, 1024):
        assert retrieval_metrics(images, texts, owner, chunk=chunk, device="cpu") == pytest.approx(ref, abs=1e-9)
