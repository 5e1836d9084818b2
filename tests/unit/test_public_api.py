"""What users import keeps importing: every name `flame` exports, and the stage entry points
the README and the demo use (the redesign moved modules into packages behind them)."""

from __future__ import annotations

import importlib

import pytest

import flame

STAGE_NAMES = [
    ("flame.train", ["TrainConfig", "Config", "main", "train", "validate", "plan", "save_checkpoint", "read_ledger",
                     "is_complete", "param_groups", "lr_lambda", "rng_state", "load_state"]),
    ("flame.embed", ["Config", "main"]),
    ("flame.evaluate", ["load_dataset", "EvalDataset", "evaluate", "Suite", "SuiteEntry", "TrainEvaluator"]),
    ("flame.store", ["EmbeddingStore"]),
    ("flame.data.images", ["tar_keys"]),
    ("flame.data.scenes", ["ScenesConfig"]),
    ("flame.baseline", ["BaselineConfig", "ClipTextConfig", "train_baseline", "load_baseline", "is_complete"]),
]


@pytest.mark.parametrize("name", flame.__all__)
def test_every_exported_name_imports(name):
    assert getattr(flame, name) is not None
    assert name in dir(flame) or name in flame.__all__


@pytest.mark.parametrize("module, names", STAGE_NAMES, ids=[m for m, _ in STAGE_NAMES])
def test_stage_entry_points_keep_their_names(module, names):
    m = importlib.import_module(module)
    missing = [n for n in names if not hasattr(m, n)]
    assert not missing, f"{module} lost {missing}"


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        flame.NoSuchThing  # noqa: B018
