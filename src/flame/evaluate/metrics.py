"""Evaluation metrics, defined exactly as CLIP_benchmark defines them.

- Classification (`classification_metrics`): `acc1`, `acc5` = fraction of samples whose label is
  among the k highest logits, chosen with `torch.topk` (so ties at the k-th place are broken the
  way `torch.topk` breaks them, as in CLIP_benchmark); `acc5` is NaN with fewer than 5 classes.
  `mean_per_class_recall` = mean over the classes present in the targets of the recall of the
  argmax prediction (sklearn's `balanced_accuracy_score`, which CLIP_benchmark calls).
- Retrieval (`retrieval_metrics`): scores = text . image; `image_retrieval_recall@k` = fraction of
  captions whose image is among the k best-scoring images; `text_retrieval_recall@k` = fraction
  of images with at least one of their captions among the k best-scoring captions. Computed in
  bounded memory, queries in chunks, each row whole (`flame.evaluate.ranking`), so ties fall
  exactly as in the unchunked computation. Where k
  exceeds the number of candidates, CLIP_benchmark would fail; we take all candidates (recall 1).
  `retrieval_ranks` also counts the queries whose top-1 score is tied (`ties`) and can rank
  recall@1 by argmax (lower index wins: the release's long-caption scripts).
- Linear probe (`linear_probe`): L2-normalised features (CLIP_benchmark's default), a
  logistic-regression classifier with an L2 penalty trained full-batch with L-BFGS; the penalty
  is searched on CLIP_benchmark's grid (97 log-spaced values in [1e-6, 1e2], 7 coarse points
  then a narrowing search) by top-1 accuracy on a validation split carved from train, then the
  classifier is refit on train+val and reported on test (`lp_acc1`, `lp_acc5`,
  `lp_mean_per_class_recall`, `weight_decay`, CLIP_benchmark's names).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

RECALL_KS = (1, 5, 10)


# ----------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------
def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1,)) -> list[float]:
    """Fraction of rows whose target is among the top-k logits, for each k (torch.topk ranking)."""
    pred = logits.topk(max(ks), dim=1, largest=True, sorted=True).indices  # [N, kmax]
    correct = pred.eq(target.view(-1, 1))
    n = len(target)
    return [float(correct[:, :k].sum().item()) / n for k in ks]


def mean_per_class_recall(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Mean over the classes present in `target` of the fraction of their samples predicted right."""
    target = target.long()
    classes = torch.unique(target)
    recalls = [(pred[target == c] == c).double().mean().item() for c in classes]
    return float(np.mean(recalls)) if recalls else float("nan")


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    logits, target = logits.float().cpu(), target.long().cpu()
    n_classes = logits.shape[1]
    if n_classes >= 5:
        acc1, acc5 = topk_accuracy(logits, target, (1, 5))
    else:
        (acc1,), acc5 = topk_accuracy(logits, target, (1,)), float("nan")
    return {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": mean_per_class_recall(logits.argmax(1), target)}


def top1_ties(logits: torch.Tensor) -> int:
    """Rows whose highest logit is shared by another class (exactly): where torch.topk, not the
    model, decides the prediction. Classes with the same name have the same vector, and ImageNet's
    OpenAI names repeat two ("missile", "sunglasses")."""
    if logits.shape[1] < 2 or not len(logits):
        return 0
    top = logits.float().topk(2, dim=1).values
    return int((top[:, 0] == top[:, 1]).sum())


def zeroshot_logits(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot logits: 100 * normalised image . class vector (no bias)."""
    return 100.0 * F.normalize(image_emb.float(), dim=-1) @ class_emb.float().T


def class_vectors(template_emb: torch.Tensor) -> torch.Tensor:
    """[C, T, D] embeddings of each class under each template -> [C, D]: the mean of the
    normalised template embeddings, renormalised (as CLIP and CLIP_benchmark do)."""
    return F.normalize(F.normalize(template_emb.float(), dim=-1).mean(dim=1), dim=-1)


# ----------------------------------------------------------------------------------------------
# retrieval
# ----------------------------------------------------------------------------------------------
def retrieval_metrics(
    image_emb,
    text_emb,
    text_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    chunk: int | None = None,
    device=None,
    text_rows: torch.Tensor | None = None,
    budget: int | None = None,
    overwrite: bool = False,
) -> dict[str, float]:
    """image_emb [I, D], text_emb [T, D] (tensors or numpy arrays, normalised here),
    text_image[t] = index of caption t's image (of the t-th of `text_rows` when given). Queries in
    chunks (`chunk` rows, default: as many as fit `budget` bytes of scores), on `device` (default
    CUDA when available): `flame.evaluate.ranking`. `overwrite=True` lets it normalise float32
    inputs in place instead of copying them (the caller's vectors then come back normalised)."""
    return retrieval_ranks(image_emb, text_emb, text_image, ks, chunk, device, text_rows, budget, overwrite)[0]


def retrieval_ranks(
    image_emb,
    text_emb,
    text_image: Sequence[int] | torch.Tensor,
    ks: Sequence[int] = RECALL_KS,
    chunk: int | None = None,
    device=None,
    text_rows: torch.Tensor | None = None,
    budget: int | None = None,
    overwrite: bool = False,
    ties: bool = False,
    first_max: bool = False,
) -> tuple[dict[str, float], dict[str, int] | None]:
    """`retrieval_metrics` and, with `ties`, the number of queries whose top-1 score is attained by
    more than one candidate, per direction ({"image_retrieval": T2I queries, "text_retrieval": I2T
    queries}; None without `ties`), counted in the same score blocks. `first_max`: recall@1 by
    `torch.argmax` (a tie goes to the lower index, as the release's long-caption scripts rank)
    instead of `torch.topk` (CLIP_benchmark)."""
    from flame.evaluate.ranking import normalised_keys, recall_hits

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    owner = torch.as_tensor(text_image, dtype=torch.long)
    n_text = len(text_emb) if text_rows is None else len(text_rows)
    if len(owner) != n_text:
        raise ValueError(f"{n_text} captions but {len(owner)} caption->image indices")
    owner = owner.to(device)
    tied = {"image_retrieval": torch.zeros(n_text, dtype=torch.bool),
            "text_retrieval": torch.zeros(len(image_emb), dtype=torch.bool)} if ties else {}
    # text -> image: caption t's positive is image owner[t]
    keys = normalised_keys(image_emb, None, device, overwrite)
    images_done = keys is image_emb  # normalised in place: not again (same floats as one normalisation)
    img_hits = recall_hits(text_emb, text_rows, keys, lambda r, idx: idx == owner[r], ks, device,
                           _budget(chunk, len(keys), budget), ties=tied.get("image_retrieval"), first_max=first_max)
    # image -> text: image i's positives are the captions t with owner[t] == i
    keys = normalised_keys(text_emb, text_rows, device, overwrite)
    txt_hits = recall_hits(image_emb, None, keys, lambda r, idx: owner[idx] == r, ks, device,
                           _budget(chunk, len(keys), budget), normalised=images_done,
                           ties=tied.get("text_retrieval"), first_max=first_max)
    del keys
    out: dict[str, float] = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = img_hits[k].float().mean().item()
        out[f"text_retrieval_recall@{k}"] = txt_hits[k].float().mean().item()
    return out, ({d: int(t.sum()) for d, t in tied.items()} if ties else None)


def _budget(chunk: int | None, n_keys: int, budget: int | None) -> int | None:
    """A fixed number of query rows (`chunk`) as a score budget; else the budget given (or None)."""
    return chunk * 4 * max(1, n_keys) if chunk else budget


# ----------------------------------------------------------------------------------------------
# linear probe
# ----------------------------------------------------------------------------------------------
WD_GRID = np.logspace(-6, 2, num=97).tolist()
WD_COARSE = [i for i in range(0, 97, 16)]  # the 7 points of np.logspace(-6, 2, 7) on the grid


def compute_device(device=None) -> torch.device:
    """Where a metric or probe runs: the given device, else CUDA when there is one, else the CPU."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def fit_logistic(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int = 200,
                 seed: int = 0) -> torch.nn.Linear:
    """Multinomial logistic regression, loss = CE + weight_decay/2 * ||W||^2, full-batch L-BFGS
    (on x's device)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(x.shape[1], n_classes).to(x.device)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) + 0.5 * weight_decay * model.weight.pow(2).sum()
        loss.backward()
        return loss

    # tiny problems are dominated by per-op overhead, which extra threads only add to
    threads = torch.get_num_threads()
    if x.numel() < 1_000_000:
        torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            opt.step(closure)
    finally:
        torch.set_num_threads(threads)
    return model


def stratified_split(y: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (rest, carved): about `fraction` of every class (at least one where a class has two
    or more samples) goes to `carved`; seeded, so reruns pick the same samples."""
    g = torch.Generator().manual_seed(seed)
    rest, carved = [], []
    for c in torch.unique(y):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = int(round(fraction * len(idx)))
        n = max(1, n) if len(idx) >= 2 else 0
        carved.append(idx[:n])
        rest.append(idx[n:])
    return torch.sort(torch.cat(rest)).values, torch.sort(torch.cat(carved)).values


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    val_fraction: float = 0.2,
    seed: int = 0,
    normalize: bool = True,
    max_iter: int = 200,
    device=None,
) -> dict[str, float]:
    """The L-BFGS probe, on `device` (default: `compute_device`, the GPU when there is one)."""
    device = compute_device(device)
    fit_idx, val_idx = stratified_split(train_y.long().cpu(), val_fraction, seed)  # seeded on the CPU: same split
    fit_idx, val_idx = fit_idx.to(device), val_idx.to(device)
    train_x, test_x = train_x.float().to(device), test_x.float().to(device)
    train_y, test_y = train_y.long().to(device), test_y.long().to(device)
    if normalize:
        train_x, test_x = F.normalize(train_x, dim=-1), F.normalize(test_x, dim=-1)
    n_classes = int(max(train_y.max().item(), test_y.max().item())) + 1
    scores: dict[int, float] = {}

    def val_acc(i: int) -> float:
        if i not in scores:
            clf = fit_logistic(train_x[fit_idx], train_y[fit_idx], n_classes, WD_GRID[i], max_iter, seed)
            with torch.no_grad():
                scores[i] = topk_accuracy(clf(train_x[val_idx]), train_y[val_idx])[0]
        return scores[i]

    def peak(candidates: list[int], best: int) -> int:
        # CLIP_benchmark's find_peak: first candidate with strictly higher accuracy wins
        best_acc = -1.0
        for i in candidates:
            acc = val_acc(i)
            if acc > best_acc:
                best, best_acc = i, acc
        return best

    if len(val_idx):
        best = peak(WD_COARSE, 0)
        span = 8
        while span > 0:
            best = peak([max(best - span, 0), best, min(best + span, len(WD_GRID) - 1)], best)
            span //= 2
        wd = WD_GRID[best]
    else:
        wd = 0.0
    clf = fit_logistic(train_x, train_y, n_classes, wd, max_iter, seed)  # refit on train + val
    with torch.no_grad():
        logits = clf(test_x)
    m = classification_metrics(logits, test_y)
    if test_y.max().item() < 5:  # CLIP_benchmark's linear probe reports acc5 only when a label >= 5 exists
        m["acc5"] = float("nan")
    return {"lp_acc1": m["acc1"], "lp_acc5": m["acc5"], "lp_mean_per_class_recall": m["mean_per_class_recall"],
            "weight_decay": wd}
