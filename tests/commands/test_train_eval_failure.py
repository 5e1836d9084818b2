"""A failing evaluation during `flame train --eval` (issue 18 item 8): the eval set is deleted in
the middle of the run. Every due step's checkpoint is still written (the final one included), each
failed evaluation is one line, and training carries on to its end (exit 0)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from support.training import TINY

from flame.cli import main as flame_main
from flame.runfolder import checkpoint_name


@pytest.mark.slow
def test_eval_set_deleted_mid_training_costs_no_checkpoint(tmp_path, tiny_llm_dir, monkeypatch, capsys):
    from flame.data.synthetic import write_shards
    from flame.train.loop import Trainer

    monkeypatch.setenv("FLAME_CACHE", str(tmp_path / "cache"))
    write_shards(tmp_path / "shards", 64, shard_size=32, size=40, seed=1)
    assert flame_main(["embed", "--data", str(tmp_path / "shards"), "--prompts", "raw=txt", "--llm",
                       str(tiny_llm_dir), "--out", str(tmp_path / "store")]) == 0
    evalset = tmp_path / "evalset"
    for c, shade in (("red", 200), ("blue", 40)):
        (evalset / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (shade, i * 20, 0)).save(evalset / c / f"{i}.png")
    (evalset / "zeroshot_classification_templates.txt").write_text("a photo of a {c} thing\n")
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"- dataset: {evalset}\n  name: colours\n")

    real_step = Trainer.train_step

    def step_then_delete(self, data):  # the eval set disappears after the first step (listed, texts cached)
        skipped = real_step(self, data)
        if self.state.step == 1:
            shutil.rmtree(evalset)
        return skipped

    monkeypatch.setattr(Trainer, "train_step", step_then_delete)
    capsys.readouterr()
    run = tmp_path / "run"
    code = flame_main(["train", "--data", str(tmp_path / "shards"), "--embeddings", str(tmp_path / "store"),
                       "--out", str(run), *TINY, "--batch-size", "8", "--steps", "4", "--workers", "0",
                       "--eval", str(suite), "--eval-every", "2", "--save-every", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "Traceback" not in out + err
    failed = [ln for ln in (out + err).splitlines() if "eval step" in ln and "failed" in ln]
    assert len(failed) == 2 and "step 2" in failed[0] and "step 4" in failed[1], out + err
    for step in (2, 4):  # the checkpoint of every evaluated step, the final one included
        assert (run / checkpoint_name(step) / "model.safetensors").is_file(), sorted(p.name for p in run.iterdir())
    records = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("eval/failed")] == [2, 4]
