"""The CLIP baseline's text tower reads tokens cut after the batch's last end-of-text: the same
features and gradients as open_clip's own `TextTransformer.forward` on the padded context."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from flame.baseline import ClipTextConfig, ClipTextTower

TEXTS = ["a red cube left of a small blue ball", "a cat", "three green triangles under a yellow star beside a lamp"]


def _tower() -> ClipTextTower:
    torch.manual_seed(0)
    return ClipTextTower(ClipTextConfig(context_length=32, width=32, heads=2, layers=2), embed_dim=16)


def _grads(out: torch.Tensor, tower: ClipTextTower, weights: torch.Tensor) -> dict[str, torch.Tensor]:
    tower.zero_grad()
    (out * weights).sum().backward()
    return {n: p.grad.clone() for n, p in tower.named_parameters() if p.grad is not None}


def test_tokens_are_cut_after_the_last_end_of_text_and_long_texts_keep_the_context():
    tower = _tower()
    padded = tower.tokenizer(TEXTS)  # open_clip's tokenizer, padded to the context
    cut = tower.tokenize(TEXTS)
    assert padded.shape[1] == 32
    assert cut.shape[1] == int((padded != 0).sum(1).max()) < 32
    assert torch.equal(padded[:, : cut.shape[1]], cut) and not padded[:, cut.shape[1]:].any()
    assert tower.tokenize(["word " * 100]).shape[1] == 32  # truncated captions end at the context


def test_cut_tokens_give_open_clips_features_and_gradients():
    tower = _tower()
    weights = torch.randn(len(TEXTS), 16)
    ours = tower(tower.tokenize(TEXTS))
    theirs = F.normalize(tower.transformer(tower.tokenizer(TEXTS)).float(), dim=-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    g_ours, g_theirs = _grads(ours, tower, weights), _grads(theirs, tower, weights)
    assert g_ours.keys() == g_theirs.keys() and "transformer.token_embedding.weight" in g_ours
    for name in g_ours:
        torch.testing.assert_close(g_ours[name], g_theirs[name], rtol=1e-4, atol=1e-4, msg=name)
