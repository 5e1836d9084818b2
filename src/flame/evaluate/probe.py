"""The linear probe of CLIP_benchmark (`metrics/linear_probe.py`), as EVAL.md section 6 describes it,
with its features streamed: `clip_benchmark_probe`.

Protocol (the release's run: lr 0.1, 20 epochs, batch 512, no validation split):
1. `torch.manual_seed(seed)` (CLIP_benchmark sets it at the start of its run), then a random
   permutation of the training rows (its `fewshot_k = -1`: all of them, in that order).
2. Each fit: `torch.manual_seed(seed)`, `torch.nn.Linear(D, C)` with PyTorch's default init and a
   bias, C = the largest training label + 1; AdamW(lr, weight_decay=wd), default betas and eps;
   cross-entropy; shuffled mini-batches of `batch_size` (a `DataLoader` with `shuffle=True`, so
   the batches are the very ones CLIP_benchmark draws) for `epochs` epochs; the lr set before
   every step to 0.5 (1 + cos(pi t / T)) lr, T = epochs x batches per epoch, no warm-up; autocast
   when `amp` (default: on CUDA only; CLIP_benchmark runs on CUDA with fp16 autocast).
3. Weight decay: 0 without a validation split. With one: CLIP_benchmark's search on
   logspace(-6, 2, 97) by validation top-1 (the 7 coarse points 0, 16, ..., 96, the first
   strictly better wins, from index 0 at accuracy 0; then spans 8, 4, 2, 1 around the peak), each
   candidate trained on train only, then the final fit on train (permuted) + val.
4. Test: `lp_acc1`, `lp_acc5` (NaN when the largest test label is < 5), `lp_mean_per_class_recall`
   (balanced accuracy), `weight_decay`, `epochs`, `seed`, `fewshot_k`, `normalized`.

Memory: features may be numpy memory maps (the image cache's `.npy` files); only one batch of
rows is read, L2-normalised (`normalize`) and moved to `device` at a time, and the test logits are
reduced batch by batch (top-5 hits and the argmax), never held whole. What stays is the
permutation and labels (int64 per row) and the classifier.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from flame.evaluate.metrics import mean_per_class_recall

WD_GRID = np.logspace(-6, 2, num=97).tolist()
WD_COARSE = list(range(0, 97, 16))  # where np.logspace(-6, 2, 7) falls on the grid


class Rows(torch.utils.data.Dataset):
    """Rows of one or more feature arrays (tensors or numpy memory maps), each part read through an
    index array, as one dataset; a batch is gathered at once (`__getitems__`)."""

    def __init__(self, parts: list[tuple], labels: list, normalize: bool):
        self.parts = [(x, np.asarray(idx, dtype=np.int64)) for x, idx in parts]
        self.source = np.concatenate([np.full(len(idx), p, dtype=np.int64) for p, (_, idx) in enumerate(self.parts)])
        self.row = np.concatenate([idx for _, idx in self.parts])
        self.labels = torch.as_tensor(np.concatenate([np.asarray(y)[idx] for y, (_, idx) in zip(labels, self.parts)]),
                                      dtype=torch.long)
        self.normalize = normalize
        self.dim = int(parts[0][0].shape[1])

    def __len__(self) -> int:
        return len(self.row)

    def __getitems__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        batch = np.asarray(batch, dtype=np.int64)
        x = torch.empty(len(batch), self.dim, dtype=torch.float32)
        for p, (feats, _) in enumerate(self.parts):
            here = np.nonzero(self.source[batch] == p)[0]
            if len(here):
                x[torch.from_numpy(here)] = _rows(feats, self.row[batch[here]])
        if self.normalize:
            x = F.normalize(x, dim=-1)
        return x, self.labels[torch.from_numpy(batch)]


class Picked:
    """Rows `idx` of a feature array (tensor or memory map), without copying them: what the probe
    reads when unreadable images are left out or a split is carved."""

    def __init__(self, base, idx):
        self.base, self.idx = base, np.asarray(idx, dtype=np.int64)
        self.shape = (len(self.idx), int(base.shape[1]))

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, rows) -> np.ndarray:
        pick = self.idx[rows]
        if isinstance(self.base, torch.Tensor):
            return self.base[torch.from_numpy(np.atleast_1d(pick))].float().numpy()
        return np.asarray(self.base[pick], dtype=np.float32)


def _rows(feats, rows: np.ndarray) -> torch.Tensor:
    if isinstance(feats, torch.Tensor):
        return feats[torch.from_numpy(rows)].float()
    return torch.from_numpy(np.asarray(feats[rows], dtype=np.float32))


def _as_is(batch):
    return batch


def loader(data: Rows, batch_size: int, shuffle: bool, device: torch.device) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=shuffle, collate_fn=_as_is,
                                       pin_memory=device.type == "cuda")


def fit(data: torch.utils.data.DataLoader, dim: int, n_classes: int, weight_decay: float, lr: float, epochs: int,
        seed: int, device: torch.device, amp: bool) -> torch.nn.Linear:
    """One CLIP_benchmark fit: seeded default init, AdamW, cosine lr without warm-up, CE."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(dim, n_classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    total = epochs * len(data)
    with torch.enable_grad():
        for epoch in range(epochs):
            for i, (x, y) in enumerate(data):
                step = i + epoch * len(data)
                for group in opt.param_groups:
                    group["lr"] = 0.5 * (1 + np.cos(np.pi * step / total)) * lr
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                opt.zero_grad()
                with torch.autocast(device.type, enabled=amp):
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
    return model


@torch.no_grad()
def scores(model: torch.nn.Linear, data: torch.utils.data.DataLoader, device: torch.device, amp: bool,
           kmax: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top-1 hit, top-kmax hit, argmax) per row, batch by batch (no full logits). Top-k as
    CLIP_benchmark's `accuracy` ranks: one torch.topk(kmax), its first column for top-1."""
    hit1, hit5, pred = [], [], []
    for x, y in data:
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.type, enabled=amp):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(kmax, logits.shape[1]), dim=1).indices
        ok = top.eq(y.view(-1, 1))
        hit1.append(ok[:, :1].any(1).cpu())
        hit5.append(ok.any(1).cpu())
        pred.append(logits.argmax(1).cpu())
    return torch.cat(hit1), torch.cat(hit5), torch.cat(pred)


def _search(train: torch.utils.data.DataLoader, val: torch.utils.data.DataLoader, fit_args: dict) -> int:
    """CLIP_benchmark's weight-decay search: the index of the chosen value on WD_GRID."""
    def peak(candidates: list[int]) -> int:
        best, best_acc = 0, 0.0
        for i in candidates:
            model = fit(train, weight_decay=WD_GRID[i], **fit_args)
            acc = scores(model, val, fit_args["device"], fit_args["amp"], kmax=1)[0].float().mean().item()
            if best_acc < acc:
                best, best_acc = i, acc
        return best

    best = peak(WD_COARSE)
    span = 8
    while span > 0:
        best = peak([max(best - span, 0), best, min(best + span, len(WD_GRID) - 1)])
        span //= 2
    return best


def clip_benchmark_probe(train_x, train_y, test_x, test_y, val_x=None, val_y=None, lr: float = 0.1,
                         epochs: int = 20, batch_size: int = 512, seed: int = 0, normalize: bool = True,
                         device=None, amp: bool | None = None, val_proportion: float | None = None) -> dict:
    """CLIP_benchmark's linear probe on features [N, D] (tensors or numpy memory maps) and labels.
    `device`: default CUDA when available; `amp`: default on CUDA only. `val_proportion`: the
    validation split is that random share of train (CLIP_benchmark's unstratified `random_split`,
    drawn right after the seed)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else amp
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    torch.manual_seed(seed)
    if val_proportion is not None and val_x is None:
        rest, held = torch.utils.data.random_split(range(len(train_x)), [1 - val_proportion, val_proportion])
        rest, held = np.asarray(rest.indices, dtype=np.int64), np.asarray(held.indices, dtype=np.int64)
        train_x, val_x, val_y, train_y = Picked(train_x, rest), Picked(train_x, held), train_y[held], train_y[rest]
    perm = torch.randperm(len(train_x)).numpy()  # fewshot_k = -1: every row, in this order
    n_classes = int(train_y.max()) + 1
    fit_args = dict(dim=int(train_x.shape[1]), n_classes=n_classes, lr=lr, epochs=epochs, seed=seed, device=device,
                    amp=amp)
    train = Rows([(train_x, perm)], [train_y], normalize)
    if val_x is not None:
        val_y = np.asarray(val_y, dtype=np.int64)
        val = Rows([(val_x, np.arange(len(val_x)))], [val_y], normalize)
        best = _search(loader(train, batch_size, True, device), loader(val, batch_size, True, device), fit_args)
        wd = WD_GRID[best]
        final = Rows([(train_x, perm), (val_x, np.arange(len(val_x)))], [train_y, val_y], normalize)
    else:
        wd, final = 0.0, train
    model = fit(loader(final, batch_size, True, device), weight_decay=wd, **fit_args)
    test = Rows([(test_x, np.arange(len(test_x)))], [test_y], normalize)
    # CLIP_benchmark takes top-1 from a top-5 ranking when a label >= 5 exists, else from top-1's
    kmax = 5 if test_y.max() >= 5 else 1
    hit1, hit5, pred = scores(model, loader(test, batch_size, False, device), device, amp, kmax)
    return {
        "lp_acc1": hit1.float().mean().item(),
        "lp_acc5": hit5.float().mean().item() if test_y.max() >= 5 else math.nan,
        "lp_mean_per_class_recall": mean_per_class_recall(pred, torch.from_numpy(test_y)),
        "weight_decay": wd, "epochs": epochs, "seed": seed, "fewshot_k": -1, "normalized": normalize,
    }
