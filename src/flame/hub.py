"""A FlameModel on the Hugging Face Hub: telling a repo id from a local path, fetching the two
files a model needs through huggingface_hub (its cache, `HF_HUB_OFFLINE`, revisions), uploading
a model folder, and refusing pickles.

Which string is a Hub repo (`hub_repo`), in this order:
- `hf-hub:ORG/NAME[@REVISION]` (open_clip's spelling) is always a Hub repo;
- a path that exists (file or folder, `~` expanded) is always local, as before this module;
- `ORG/NAME` (one `/`, letters, digits, `-`, `_`, `.`; not starting with `.`, `/` or `~`) that is
  not an existing path is a Hub repo;
- anything else, and every `pathlib.Path`, is a local path.

Only `config.json` and `model.safetensors` are fetched (allow_patterns). A model is read from
safetensors only: a folder or repo holding a pickle (`*.bin`, `*.pt`, ...) instead is refused,
and nothing is ever unpickled or executed.
"""

from __future__ import annotations

import fnmatch
import re
from pathlib import Path

from flame.errors import FlameError, first_line

PREFIX = "hf-hub:"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"
MODEL_FILES = (CONFIG, WEIGHTS)  # what from_pretrained fetches
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
_REPO_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")


def check_repo_id(repo: str, spec: str | None = None) -> str:
    """`repo` if it is a valid `ORG/NAME` Hub repo id, else one FlameError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    what = f"{spec!r}: " if spec and spec != repo else ""
    if not _REPO_ID.fullmatch(repo or ""):
        raise FlameError(f"{what}{repo!r} is not a Hugging Face repo id (expected ORG/NAME)")
    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        raise FlameError(f"{what}{repo!r} is not a Hugging Face repo id: {first_line(e)}") from None
    return repo


def hub_repo(spec: str | Path) -> tuple[str, str | None] | None:
    """(repo id, revision written after `@` or None) when `spec` names a Hub repo (module
    docstring), None when it is a local path."""
    if isinstance(spec, Path):
        return None
    spec = str(spec)
    if spec.startswith(PREFIX):
        repo, _, revision = spec[len(PREFIX):].partition("@")
        return check_repo_id(repo, spec), revision or None
    if Path(spec).expanduser().exists() or not _REPO_ID.fullmatch(spec) or spec.startswith("."):
        return None
    return check_repo_id(spec), None


def pickles_in(names) -> list[str]:
    return sorted(n for n in names if any(fnmatch.fnmatch(Path(n).name.lower(), p) for p in PICKLES))


def missing_weights(where: str, names) -> FlameError:
    """The error for a model without model.safetensors, naming any pickle it holds instead."""
    found = pickles_in(names)
    if not found:
        return FlameError(f"{where} has no {WEIGHTS}")
    return FlameError(
        f"{where} has no {WEIGHTS}, only {', '.join(found)}: a pickle, which FLAME never loads (nothing in a model "
        f"is executed; a model is read from {WEIGHTS} only: save it with FlameModel.save_pretrained, or convert the "
        f"FLAME release's checkpoint with flame convert)"
    )


def check_target(folder: Path) -> Path:
    """`folder` if a model folder may be written there: new, empty, or holding only the files
    a model folder holds (and their write temporaries); anything else is one FlameError."""
    from flame.fileio import TMP_SUFFIX

    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise FlameError(f"{folder} exists and is not a folder: choose a new folder for the model")
    if folder.is_dir():
        stray = sorted(p.name for p in folder.iterdir()
                       if p.name not in (CONFIG, WEIGHTS, CARD) and not p.name.endswith(TMP_SUFFIX))
        if stray:
            raise FlameError(f"{folder} holds {stray[0]!r}, so it is not a model folder: nothing written "
                             f"(a model folder holds only {CONFIG}, {WEIGHTS} and {CARD}; choose a new folder)")
    return folder


def _where(repo: str, revision: str | None) -> str:
    return f"Hugging Face repo {repo}" + (f"@{revision}" if revision else "")


def _listing(repo: str, revision: str | None, token, snapshot: Path) -> list[str]:
    """The repo's file names (the Hub's listing when online, else what the cached snapshot holds)."""
    from huggingface_hub import HfApi, constants

    if not constants.HF_HUB_OFFLINE:
        try:
            return HfApi().list_repo_files(repo, revision=revision, token=token)
        except (OSError, ValueError):
            pass
    return [p.name for p in snapshot.iterdir()] if snapshot.is_dir() else []


def _not_cached(where: str, cache_dir, local_only: bool, e: Exception) -> FlameError:
    from huggingface_hub import constants

    cache = cache_dir or constants.HF_HUB_CACHE
    if local_only or constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "local_files_only=True"
        return FlameError(f"{where} is not in the Hugging Face cache {cache} and {why}, so nothing can be downloaded: "
                          f"run once online (or `hf download`) first")
    return FlameError(f"{where}: cannot download it and it is not in the Hugging Face cache {cache} ({first_line(e)})")


def download(repo: str, revision: str | None = None, cache_dir=None, token=None, local_files_only: bool = False,
             spec: str | None = None) -> Path:
    """The snapshot folder holding the model's config.json and model.safetensors (fetched into
    the Hugging Face cache if not there yet). Every failure is one FlameError naming the repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = _where(repo, revision)
    if spec and not str(spec).startswith(PREFIX):
        where += " (no local path of that name)"
    try:
        folder = Path(snapshot_download(repo, revision=revision, cache_dir=cache_dir, token=token,
                                        local_files_only=local_files_only, allow_patterns=list(MODEL_FILES)))
    except GatedRepoError as e:
        raise FlameError(f"{where} is gated: accept its terms on the Hub and log in ({first_line(e)})") from None
    except RevisionNotFoundError:
        raise FlameError(f"{where}: the repo has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FlameError(f"{where} does not exist on the Hub (or is private: log in with `hf auth login`)") from None
    except LocalEntryNotFoundError as e:
        raise _not_cached(where, cache_dir, local_files_only, e) from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise _not_cached(where, cache_dir, local_files_only, e) from None
    if not (folder / WEIGHTS).is_file():
        raise missing_weights(where, _listing(repo, revision, token, folder))
    if not (folder / CONFIG).is_file():
        raise FlameError(f"{where} is not a FLAME model repo (no {CONFIG})")
    return folder


def upload(folder: Path, repo: str, private: bool | None = None, revision: str | None = None,
           commit_message: str | None = None, token=None) -> str:
    """Create `repo` (kept if it exists), the branch `revision` if given, and upload `folder` as
    one commit; returns the commit's URL. Failures are one FlameError."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    check_repo_id(repo)
    api = HfApi(token=token)
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=repo, folder_path=str(folder), revision=revision, repo_type="model",
                                 commit_message=commit_message or "Upload FLAME model")
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise FlameError(f"cannot push to Hugging Face repo {repo}: {first_line(e)}") from None
    return str(getattr(info, "commit_url", info))
