"""A real Hugging Face hub cache in a temporary folder, as `hf download` lays it out (no network):

CACHE/models--ORG--NAME/blobs/SHA256          each file's bytes once
CACHE/models--ORG--NAME/snapshots/COMMIT/...  the repository's tree, relative links into blobs/
CACHE/models--ORG--NAME/refs/BRANCH           the commit a branch or tag points at
"""

import hashlib
import os
from pathlib import Path


def cache_snapshot(cache: Path, repo: str, folder: Path, refs: tuple[str, ...] = ("main",)) -> str:
    """Put `folder`'s files in the cache as repo's snapshot, pointed at by `refs`; returns the commit hash."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    tree = hashlib.sha1()
    for path in files:
        tree.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    commit = tree.hexdigest()  # 40 hex digits, as a git commit
    storage = cache / ("models--" + repo.replace("/", "--"))
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    for path in files:
        blob = storage / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        blob.write_bytes(path.read_bytes())
        link = storage / "snapshots" / commit / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (storage / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (storage / "refs" / ref).write_text(commit)
    return commit
