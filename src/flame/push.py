"""`flame push RUN_OR_MODEL ORG/NAME`: share a trained (or converted) model on the Hugging Face Hub.

Writes the self-contained model folder (`FlameModel.save_pretrained`: model.safetensors,
config.json, a README.md model card with the run's recipe and the `--eval` results as
`model-index` metadata) and uploads it as one commit with huggingface_hub's HfApi
(create_repo, then upload_folder). `--dry-run FOLDER` writes the folder and uploads nothing.
Every input (repo id, eval files, the model) is checked before anything is written or sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flame.config import setting

DESCRIPTION = "Upload a run's latest checkpoint or a model folder to the Hugging Face Hub, with a model card."
EPILOG = """\
  flame push runs/b16 me/flame-b16 --eval zeroshot.json --eval retrieval.json
  flame push runs/b16 me/flame-b16 --dry-run shared/flame-b16      # look at the folder and card first
  flame push flame-b16-cc3m me/flame-b16-cc3m --private --branch v1 # a converted release model

Log in first (`hf auth login` or HF_TOKEN). The model then loads anywhere with
  FlameModel.from_pretrained("me/flame-b16")            # or revision="v1", or "hf-hub:me/flame-b16@v1"
"""


@dataclass
class Config:
    """`flame push` settings."""

    model: str = setting("", positional=True, metavar="RUN_OR_MODEL", required=True,
                         help="run folder (its latest checkpoint), checkpoint/model folder or Hub repo id")
    repo: str = setting("", positional=True, metavar="ORG/NAME", required=True, help="Hugging Face repo to push to")
    private: bool = setting(False, help="create the repo as private (an existing repo keeps its visibility)")
    revision: str | None = setting(None, aliases=("--branch",), metavar="BRANCH",
                                   help="branch to commit to, created if needed (default main)")
    commit_message: str | None = setting(None, metavar="TEXT", shown="Upload FLAME model", help="commit message")
    eval: list[str] = setting([], repeat=True, metavar="FILE.json",
                              help="flame eval --output files whose results go into the card's model-index")
    dry_run: str | None = setting(None, metavar="FOLDER",
                                  help="write the model folder and card here and upload nothing")


def _digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(folder / "model.safetensors", "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def check_same_model(results: list[dict], source: Path | None, path: str) -> None:
    """A result whose "model" (the folder `flame eval` loaded) exists here and holds other weights
    than the model pushed is refused: its numbers would describe a different model."""
    from flame.errors import FlameError

    for r in results:
        named = Path(str(r.get("model") or ""))
        if source is None or not r.get("model") or not (named / "model.safetensors").is_file():
            continue
        if named.resolve() != Path(source).resolve() and _digest(named) != _digest(Path(source)):
            raise FlameError(f"--eval {path}: its results are of {named}, not of the model pushed ({source}); "
                             f"evaluate this model (flame eval --model {source}) or leave the file out")


def main(cfg: Config) -> int:
    from flame.hub import check_repo_id
    from flame.model import FlameModel
    from flame.modelcard import read_evals

    check_repo_id(cfg.repo)
    results = read_evals(cfg.eval)
    model = FlameModel.from_pretrained(cfg.model)
    for path in cfg.eval:
        check_same_model(read_evals([path]), model.source, path)
    what = f"{model.source} ({len(results)} eval result(s) in the card)"
    if cfg.dry_run:
        folder = model.save_pretrained(Path(cfg.dry_run), repo_id=cfg.repo, evals=results)
        print(f"flame push: dry run: {what} -> {folder} (model.safetensors, config.json, README.md); nothing uploaded")
        return 0
    url = model.push_to_hub(cfg.repo, private=cfg.private or None, revision=cfg.revision,
                            commit_message=cfg.commit_message, evals=results)
    print(f"flame push: {what} -> https://huggingface.co/{cfg.repo} ({url})")
    return 0
