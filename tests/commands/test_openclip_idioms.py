"""open_clip's idioms on a FLAME model: open_clip's README zero-shot snippet, with its import
changed, gives what `flame eval` computes on the same model and images."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from support.commands import run_flame
from support.evalsets import PALETTE, colour_word_llm, palette_folder, tiny_model_folder

from flame.evaluate import metrics as M
from flame.evaluate.datasets import load_dataset
from flame.evaluate.images import split_vectors
from flame.evaluate.tasks import class_prompts


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory, tiny_llm_dir):
    mp = pytest.MonkeyPatch()
    root = tmp_path_factory.mktemp("openclip")
    mp.setenv("FLAME_CACHE", str(root / "cache"))
    # class names whose text vectors differ (orthogonal colour words), so images pick different classes
    tiny_model_folder(root / "model", colour_word_llm(tiny_llm_dir, root / "llm"))
    palette_folder(root / "set", n=12)
    yield root
    mp.undo()


def readme_snippet(model_name: str, image_paths, labels):
    """open_clip's README example, `import open_clip` -> `import flame as open_clip`; one image at a time."""
    import flame as open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    model.eval()  # model in train mode by default, impacts some models with BatchNorm or stochastic depth active
    tokenizer = open_clip.get_tokenizer(model_name)

    text = tokenizer(labels)
    rows = []
    for path in image_paths:
        image = preprocess(Image.open(path)).unsqueeze(0)
        with torch.no_grad(), torch.autocast("cuda", enabled=torch.cuda.is_available()):
            image_features = model.encode_image(image)
            text_features = model.encode_text(text)
            image_features /= image_features.norm(dim=-1, keepdim=True)
            text_features /= text_features.norm(dim=-1, keepdim=True)

            text_probs = (100.0 * image_features @ text_features.T).softmax(dim=-1)
        rows.append(text_probs[0])
    return torch.stack(rows)


def test_open_clip_readme_snippet_gives_flame_evals_result(colour_model, capsys):
    folder, model_dir = colour_model / "set", colour_model / "model"
    ds = load_dataset(folder)
    items = ds.items("test")
    classes = list(ds.classnames)
    assert classes == sorted(PALETTE) and ds.templates == ["a photo of a {c}."]
    probs = readme_snippet(str(model_dir), [it.file for it in items], [f"a photo of a {c}." for c in classes])

    # flame's own evaluation of the same model and images: its image vectors, class vectors and logits
    from flame.model import FlameModel

    model = FlameModel.from_pretrained(model_dir)
    vec = split_vectors(model, ds, "test", "embed", workers=0, cache_dir=False, progress=False)
    emb = model.encode_text(class_prompts(ds)).view(len(classes), len(ds.templates), -1)
    expected = M.zeroshot_logits(vec.vectors, M.class_vectors(emb)).softmax(dim=-1)
    top1 = probs.argmax(dim=1)
    assert len(set(top1.tolist())) > 1  # the images do not all pick one class
    assert torch.equal(top1, expected.argmax(dim=1))
    assert torch.allclose(probs, expected, atol=1e-6, rtol=0)

    out = colour_model / "eval.json"
    code, _, err = run_flame(capsys, "eval", "--model", model_dir, "--dataset", folder, "--output", out,
                             "--workers", "0", "--no-progress")
    assert code == 0, err
    labels = torch.tensor([it.label for it in items])
    acc1 = (top1 == labels).float().mean().item()
    assert abs(json.loads(out.read_text())["metrics"]["acc1"] - acc1) <= 1e-6
    print(f"snippet top-1 {top1.tolist()}, acc1 {acc1:.3f} = flame eval's")


def test_tokenizer_output_and_normalize_flags(colour_model):
    import flame

    model, train, val = flame.create_model_and_transforms(f"local-dir:{colour_model / 'model'}")
    tok = flame.get_tokenizer(model)
    batch = tok(["a photo of a red.", "a photo of a blue."])
    assert batch.prompts == "raw" and len(batch) == 2
    plain = model.encode_text(["a photo of a red.", "a photo of a blue."], prompts="raw")
    assert torch.equal(model.encode_text(batch), plain)
    assert torch.equal(model.encode_text(batch, normalize=False), plain)  # unit length by definition
    assert model.encode_text(batch.to("cpu")).device.type == "cpu"
    long = model.encode_text(flame.get_tokenizer(model, prompts="long")(["a photo of a red."]))
    assert not torch.allclose(long, plain[:1])
    image = Image.open(next((colour_model / "set" / "red").iterdir()))
    x = val(image)[None]
    raw = model.encode_image(x, normalize=False)
    assert torch.allclose(model.encode_image(x), raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(1))
    assert torch.equal(val(image), model.preprocess(image))
    assert train(image).shape == val(image).shape == (3, model.image_size, model.image_size)
    with pytest.raises(flame.FlameError, match="float32"):
        flame.create_model(str(colour_model / "model"), precision="fp16")
