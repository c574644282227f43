"""Hugging Face Hub ids from the local cache: `--model ORG/NAME[@REVISION]` (and `--lora`, `--clip`).

A name that is a folder or file here is used as it is. Otherwise a name shaped like a Hub id resolves to its
snapshot folder in the local hub cache, laid out as `huggingface_hub` downloads it:

    $HF_HUB_CACHE (default $HF_HOME/hub, ~/.cache/huggingface/hub)
      models--ORG--NAME/refs/main              the commit a branch or tag points at
      models--ORG--NAME/snapshots/COMMIT/...   the repository's files (links into blobs/)
      models--ORG--NAME/blobs/...

Nothing is downloaded: the explorer runs offline (`snapshot_download(local_files_only=True)`), and an id
missing from the cache is an error that names the id, the cache folder and the command that fetches it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

from explorer.errors import ExplorerError

logger = logging.getLogger(__name__)

# ORG/NAME[@REVISION]: the Hub's repository names (letters, digits, - _ .), a branch, tag or commit after @
HUB_ID = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """'ORG/NAME@REVISION' -> ('ORG/NAME', 'REVISION'); None when the name is not shaped like a Hub id."""
    match = HUB_ID.match(name)
    if match is None or name.startswith(".") or ".." in match["repo"]:
        return None
    return match["repo"], match["revision"]


def hub_cache() -> Path:
    """The hub cache folder huggingface_hub reads ($HF_HUB_CACHE, else $HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def local_or_cached(name: str | Path, what: str, cache_dir: str | Path | None = None) -> Path:
    """The path `name` when it exists here, else the snapshot folder of the Hub id `name` in the local cache.

    what: what the name should be, for the error ("model", "LoRA adapter", "CLIP model"). A name that is
    neither an existing path nor shaped like a Hub id, or whose first part is a folder here (`assets/model`
    with `assets/` present: a path), is returned unchanged, for the caller to refuse."""
    path = Path(name)
    if path.exists():
        return path
    parsed = parse_hub_id(str(name))
    if parsed is None or Path(parsed[0].split("/")[0]).is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError

    repo, revision = parsed
    cache = Path(cache_dir) if cache_dir is not None else hub_cache()
    at = f" at revision {revision!r}" if revision else ""
    fetch = f"`hf download {repo}" + (f" --revision {revision}" if revision else "") + "`"
    try:
        folder = snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True)
    except IncompleteSnapshotError as error:
        raise ExplorerError(
            f"{what} {str(name)!r}: the Hub id {repo!r}{at} is only partly in the Hugging Face cache "
            f"{str(cache)!r} (an interrupted download): complete it with {fetch}"
        ) from error
    except (LocalEntryNotFoundError, HFValidationError) as error:
        raise ExplorerError(
            f"{what} {str(name)!r} is not a folder here, and the Hub id {repo!r}{at} is not in the local "
            f"Hugging Face cache {str(cache)!r} (nothing is downloaded: the explorer runs offline): "
            f"download it with {fetch} (`huggingface-cli download` before huggingface_hub 1.0), set "
            "HF_HUB_CACHE or HF_HOME to the cache that holds it, or pass a local folder"
        ) from error
    logger.info("%s %s: %s from the hub cache", what, name, folder)
    return Path(folder)
