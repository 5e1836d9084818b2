"""Evaluation metrics: brute-force references with known answers (ties, several captions per
image) and identity with the clip-benchmark package's own metric code on the same embeddings."""

from __future__ import annotations

import builtins
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flame.evaluate.metrics import (
    class_vectors,
    classification_metrics,
    fit_logistic,
    linear_probe,
    mean_per_class_recall,
    retrieval_metrics,
    stratified_split,
    topk_accuracy,
    zeroshot_logits,
)


# ---------------------------------------------------------------------------------------------
# brute-force references
# ---------------------------------------------------------------------------------------------
def brute_topk(logits: np.ndarray, target: np.ndarray, k: int) -> float:
    """Rank of the target = number of classes with a strictly higher logit (no ties in the input)."""
    hits = [(row > row[t]).sum() < k for row, t in zip(logits, target)]
    return float(np.mean(hits))


def brute_recalls(img: np.ndarray, txt: np.ndarray, owner: list[int], k: int) -> tuple[float, float]:
    """(image_retrieval_recall@k, text_retrieval_recall@k) by explicit ranking, no ties in the input."""
    s = txt @ img.T  # [T, I]
    i2 = [(s[t] > s[t, owner[t]]).sum() < k for t in range(len(txt))]
    t2 = []
    for i in range(len(img)):
        col = s[:, i]
        t2.append(any((col > col[t]).sum() < k for t in range(len(txt)) if owner[t] == i))
    return float(np.mean(i2)), float(np.mean(t2))


def test_classification_matches_brute_force_on_random_logits():
    rng = np.random.default_rng(0)
    for n_classes in (3, 7, 40):
        logits = rng.standard_normal((300, n_classes)).astype(np.float32)
        target = rng.integers(0, n_classes, 300)
        m = classification_metrics(torch.tensor(logits), torch.tensor(target))
        assert m["acc1"] == pytest.approx(brute_topk(logits, target, 1))
        if n_classes >= 5:
            assert m["acc5"] == pytest.approx(brute_topk(logits, target, 5))
        else:
            assert math.isnan(m["acc5"])
        pred = logits.argmax(1)
        ref = np.mean([np.mean(pred[target == c] == c) for c in np.unique(target)])
        assert m["mean_per_class_recall"] == pytest.approx(ref)


def test_classification_known_answers_with_ties():
    # class 1 is the target everywhere; rows chosen so the answer does not depend on tie-breaking
    logits = torch.tensor([
        [0.0, 5.0, 5.0, 1.0, 1.0, 1.0],   # tie for first with the target: both in the top 2 -> top-1 ambiguous
        [9.0, 2.0, 2.0, 2.0, 2.0, 8.0],   # target tied in 3rd-6th place: within the top 6 only, not top 2
        [1.0, 7.0, 0.0, 0.0, 0.0, 0.0],   # clear top-1
        [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],   # all tied: in the top 6 for sure
    ])
    target = torch.ones(4, dtype=torch.long)
    top1, top2, top6 = topk_accuracy(logits, target, (1, 2, 6))
    assert top6 == 1.0
    assert top2 == pytest.approx(2 / 4 + (1 / 4) * top2_row3(logits))  # rows 0, 2 sure; row 3 depends on topk
    # top-1: rows 0 and 3 are ties resolved by torch.topk; row 2 is certain; row 1 certainly wrong
    assert 1 / 4 <= top1 <= 3 / 4
    ranked = logits.topk(1, dim=1).indices.flatten()
    assert top1 == pytest.approx(float((ranked == 1).float().mean()))


def top2_row3(logits: torch.Tensor) -> float:
    return float(1 in logits[3].topk(2).indices.tolist())


def test_mean_per_class_recall_equals_sklearn_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(1)
    target = rng.integers(0, 6, 200)
    pred = np.where(rng.random(200) < 0.6, target, rng.integers(0, 9, 200))  # also predicts classes 6-8 (absent)
    target[target == 4] = 3  # class 4 absent from the targets
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = balanced_accuracy_score(target, pred)
    assert mean_per_class_recall(torch.tensor(pred), torch.tensor(target)) == pytest.approx(ref, abs=1e-12)


def test_retrieval_known_answers_several_captions_per_image():
    # 3 images (axes), 5 captions: image 0 has captions 0,1; image 1 has 2; image 2 has 3,4
    img = torch.eye(3)
    txt = torch.tensor([
        [1.0, 0.0, 0.0],   # own image first
        [0.0, 1.0, 0.1],   # image 1 first, image 2 second, own image (0) last
        [0.0, 1.0, 0.0],   # own image first
        [0.0, 0.2, 1.0],   # own image first
        [0.9, 0.0, 0.5],   # image 0 first, own image second
    ])
    owner = [0, 0, 1, 2, 2]
    m = retrieval_metrics(img, txt, owner, ks=(1, 2, 3))
    # text -> image (per caption): R@1 = captions 0,2,3 -> 3/5; R@2 adds caption 4 -> 4/5; R@3 all
    assert m["image_retrieval_recall@1"] == pytest.approx(3 / 5)
    assert m["image_retrieval_recall@2"] == pytest.approx(4 / 5)
    assert m["image_retrieval_recall@3"] == 1.0
    # image -> text (per image, any own caption): image 0 best caption 0 (own); image 1: captions 1,2
    # tie at score 1.0 (both count? caption 2 is own; caption 1 is not) -> at k=2 certainly a hit;
    # image 2: caption 3 (1.0) own -> hit at 1
    assert m["text_retrieval_recall@2"] == 1.0
    assert m["text_retrieval_recall@1"] in (2 / 3, 1.0)  # image 1's top-1 is a tie, broken by torch.topk


def test_retrieval_matches_brute_force_on_random_embeddings():
    rng = np.random.default_rng(2)
    img = rng.standard_normal((40, 8)).astype(np.float32)
    owner = [i for i in range(40) for _ in range(int(rng.integers(1, 5)))]  # 1-4 captions per image
    txt = img[owner] + 1.5 * rng.standard_normal((len(owner), 8)).astype(np.float32)
    img_n = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt_n = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    m = retrieval_metrics(torch.tensor(img), torch.tensor(txt), owner, chunk=7)  # chunking must not matter
    for k in (1, 5, 10):
        i2, t2 = brute_recalls(img_n, txt_n, owner, k)
        assert m[f"image_retrieval_recall@{k}"] == pytest.approx(i2)
        assert m[f"text_retrieval_recall@{k}"] == pytest.approx(t2)
    assert 0.0 < m["image_retrieval_recall@1"] < 1.0  # a real test, not a saturated one


def test_retrieval_k_larger_than_candidates_is_full_recall():
    m = retrieval_metrics(torch.eye(3), torch.eye(3), [0, 1, 2], ks=(10,))
    assert m["image_retrieval_recall@10"] == 1.0 and m["text_retrieval_recall@10"] == 1.0


# ---------------------------------------------------------------------------------------------
# identity with the clip-benchmark package's own metric code
# ---------------------------------------------------------------------------------------------
class TableModel:
    """A 'CLIP model' for clip_benchmark's code: images are already embeddings, texts are ids into a table."""

    def __init__(self, table: torch.Tensor):
        self.table = table

    def encode_image(self, x):
        return x

    def encode_text(self, ids):
        return self.table[ids]


def numpy2_float(x):
    """clip_benchmark's `accuracy` calls float() on a 1-element array, which NumPy 2 refuses;
    this module-level `float` (used only inside their module) takes the element, as NumPy 1 did."""
    return builtins.float(np.asarray(x).reshape(-1)[0]) if not isinstance(x, str) else builtins.float(x)


def test_zeroshot_classification_equals_clip_benchmark(monkeypatch):
    from clip_benchmark.metrics import zeroshot_classification as cb

    monkeypatch.setattr(cb, "float", numpy2_float, raising=False)

    rng = torch.Generator().manual_seed(3)
    n_classes, n_templates, dim = 12, 4, 16
    text_table = torch.randn(n_classes * n_templates, dim, generator=rng)
    classnames = [f"c{i}" for i in range(n_classes)]
    templates = [f"t{j} {{c}}" for j in range(n_templates)]
    ids = {t.format(c=c): i * n_templates + j for i, c in enumerate(classnames) for j, t in enumerate(templates)}
    tokenizer = lambda texts: torch.tensor([ids[t] for t in texts])  # noqa: E731
    centers = torch.randn(n_classes, dim, generator=rng)
    target = torch.randint(0, n_classes, (300,), generator=rng)
    images = centers[target] + 2.0 * torch.randn(300, dim, generator=rng)
    # ties: duplicate some images exactly and give two classes identical template embeddings
    images[10:20] = images[0]
    text_table[n_templates: 2 * n_templates] = text_table[:n_templates]

    ds = torch.utils.data.TensorDataset(images, target)
    ds.classes = classnames
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    model = TableModel(text_table)
    ref = cb.evaluate(model, loader, tokenizer, classnames, templates, "cpu", amp=False)

    ours_cls = class_vectors(text_table.view(n_classes, n_templates, dim))
    ref_cls = cb.zero_shot_classifier(model, tokenizer, classnames, templates, "cpu", amp=False)
    assert torch.allclose(ours_cls, ref_cls.T, atol=1e-6)
    logits = zeroshot_logits(images, ours_cls)
    ours = classification_metrics(logits, target)
    assert ours == pytest.approx(ref, abs=1e-12)
    assert 0.1 < ours["acc1"] < 0.95
    # the bare top-k helper too
    assert topk_accuracy(logits, target, (1, 5)) == cb.accuracy(logits, target, topk=(1, 5))


def test_retrieval_equals_clip_benchmark():
    from clip_benchmark.metrics import zeroshot_retrieval as cb

    rng = torch.Generator().manual_seed(4)
    n_img, dim = 50, 12
    counts = torch.randint(1, 6, (n_img,), generator=rng).tolist()  # several captions per image
    owner = [i for i, c in enumerate(counts) for _ in range(c)]
    images = torch.randn(n_img, dim, generator=rng)
    texts = images[owner] + 1.2 * torch.randn(len(owner), dim, generator=rng)
    texts[5] = texts[4]  # a duplicated caption (ties)
    images[7] = images[6]  # a duplicated image (ties)
    captions, start = [], 0
    for c in counts:
        captions.append([f"cap{t}" for t in range(start, start + c)])
        start += c
    tokenizer = lambda caps: torch.tensor([int(c[3:]) for c in caps])  # noqa: E731

    class Pairs(torch.utils.data.Dataset):
        def __len__(self):
            return n_img

        def __getitem__(self, i):
            return images[i], captions[i]

    loader = torch.utils.data.DataLoader(Pairs(), batch_size=16, collate_fn=lambda b: (
        torch.stack([x for x, _ in b]), [y for _, y in b]))
    ref = cb.evaluate(TableModel(texts), loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = retrieval_metrics(images, texts, owner)
    assert ours == pytest.approx(ref, abs=1e-12)
    assert 0.05 < ours["image_retrieval_recall@1"] < 0.95


# ---------------------------------------------------------------------------------------------
# linear probe
# ---------------------------------------------------------------------------------------------
def test_logistic_fit_equals_sklearn():
    """Our L-BFGS logistic regression (mean CE + wd/2 ||W||^2, bias free) is sklearn's with C = 1/(wd N)."""
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(5)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int) + (x[:, 2] > 0.8).astype(int)
    wd = 0.05
    ours = fit_logistic(torch.tensor(x), torch.tensor(y), 3, wd, max_iter=500)
    ref = LogisticRegression(C=1.0 / (wd * len(x)), max_iter=5000, tol=1e-10).fit(x, y)
    with torch.no_grad():
        p_ours = torch.softmax(ours(torch.tensor(x)), 1).numpy()
    assert np.abs(p_ours - ref.predict_proba(x)).max() < 2e-3


def test_linear_probe_learns_and_chooses_regularisation_on_validation():
    rng = torch.Generator().manual_seed(6)
    centers = torch.randn(6, 20, generator=rng) * 2
    ytr, yte = torch.randint(0, 6, (240,), generator=rng), torch.randint(0, 6, (120,), generator=rng)
    xtr = centers[ytr] + torch.randn(240, 20, generator=rng)
    xte = centers[yte] + torch.randn(120, 20, generator=rng)
    m = linear_probe(xtr, ytr, xte, yte)
    assert set(m) == {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "weight_decay"}
    assert m["lp_acc1"] > 0.8 and m["lp_acc5"] >= m["lp_acc1"]
    assert 1e-6 <= m["weight_decay"] <= 1e2
    # pure-noise labels: the search prefers strong regularisation and the test score is near chance
    noise = linear_probe(torch.randn(240, 20, generator=rng), ytr, torch.randn(120, 20, generator=rng), yte)
    assert noise["lp_acc1"] < 0.4


def test_stratified_split_is_seeded_and_per_class():
    y = torch.tensor([0] * 10 + [1] * 5 + [2])
    rest, val = stratified_split(y, 0.2, seed=0)
    assert sorted(torch.cat([rest, val]).tolist()) == list(range(16))
    assert (y[val] == 0).sum() == 2 and (y[val] == 1).sum() == 1 and (y[val] == 2).sum() == 0
    assert torch.equal(val, stratified_split(y, 0.2, seed=0)[1])
    assert F.normalize(torch.ones(1, 2), dim=-1).shape == (1, 2)
