"""A Hugging Face Hub cache written by huggingface_hub's own cache-writing functions (the ones its
downloads use: `repo_folder_name`, `_get_pointer_path`, `_create_symlink`,
`_cache_commit_hash_for_specific_revision`), checked with its `scan_cache_dir`, and the Hub API
with its network calls intercepted. Nothing here touches the network."""

from __future__ import annotations

import hashlib
import shutil
import socket
from pathlib import Path


def cache_commit(cache: Path, repo: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `folder`'s files into `cache` as the commit `commit` of model repo `repo`, as a download
    would: each file as a blob named by its hash, snapshots/COMMIT/NAME linking to it, and each of
    `refs` (branch or tag names) recorded as pointing at `commit`. Returns the snapshot folder."""
    from huggingface_hub import file_download as fd

    storage = cache / fd.repo_folder_name(repo_id=repo, repo_type="model")
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        blob = storage / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        new = not blob.exists()
        if new:
            shutil.copyfile(f, blob)
        pointer = Path(fd._get_pointer_path(str(storage), commit, f.name))
        pointer.parent.mkdir(parents=True, exist_ok=True)
        fd._create_symlink(str(blob), str(pointer), new_blob=new)
    for ref in refs:
        fd._cache_commit_hash_for_specific_revision(str(storage), ref, commit)
    return storage / "snapshots" / commit


def scanned(cache: Path, repo: str) -> dict[str, set[str]]:
    """huggingface_hub's own reading of the cache: commit -> file names, for `repo` (asserting the
    scan found no corrupted entry)."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (entry,) = [r for r in info.repos if r.repo_id == repo]
    return {rev.commit_hash: {f.file_name for f in rev.files} for rev in entry.revisions}


def go_offline(monkeypatch):
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (its constant is read at import), and any
    attempt to open a network connection fails the test."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return constants  # the module whose settings (HF_HUB_CACHE) a test may change further


class FakeHub:
    """Records HfApi's create_repo / create_branch / upload_folder calls (intercepted: nothing is
    sent), keeping a copy of every uploaded folder's files."""

    def __init__(self, monkeypatch, tmp: Path):
        from huggingface_hub import CommitInfo, HfApi

        self.calls: list[tuple[str, dict]] = []
        self.uploaded: dict[str, bytes] = {}

        def create_repo(api, repo_id, **kw):
            self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
            return f"https://huggingface.co/{repo_id}"

        def create_branch(api, repo_id, **kw):
            self.calls.append(("create_branch", {"repo_id": repo_id, **kw}))

        def upload_folder(api, **kw):
            self.calls.append(("upload_folder", kw))
            folder = Path(kw["folder_path"])
            self.uploaded = {p.name: p.read_bytes() for p in folder.iterdir()}
            shutil.copytree(folder, tmp / "uploaded", dirs_exist_ok=True)
            url = f"https://huggingface.co/{kw['repo_id']}/commit/{'0' * 40}"
            return CommitInfo(commit_url=url, commit_message=kw.get("commit_message") or "",
                              commit_description="", oid="0" * 40)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        self.folder = tmp / "uploaded"

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]
