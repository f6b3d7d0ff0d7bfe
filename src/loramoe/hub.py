"""Adapters on the Hugging Face Hub: telling a repository id from a local path, and fetching only adapter files.

Design decisions:

- An existing local directory always wins. Only a string that is not one, and has the Hub's ``namespace/name``
  form, is a repository id; so ``runs/sft`` is the local folder when it exists and a Hub id otherwise, and the
  error for a missing one names both readings.
- ``snapshot_download`` with ``allow_patterns`` limited to the adapter's two files: a pickle, a README or anything
  else in the repository is never downloaded. The files land in ``huggingface_hub``'s own cache
  (``$HF_HOME/hub``), so ``HF_HUB_OFFLINE=1`` loads a repository fetched before and the cache is shared with
  every other Hugging Face library.
- The folder returned is loaded exactly like a local one (safetensors only, the checksum in
  ``adapter_config.json``, names and shapes), so the Hub adds no new way in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from loramoe.errors import AdapterError

# The Hub's "namespace/name" form (huggingface_hub.utils.validate_repo_id, less the bare-name legacy form).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,94}/[A-Za-z0-9][\w.-]{0,94}")


def is_hub_id(source: str | os.PathLike[str]) -> bool:
    """True when ``source`` is not an existing directory and reads as a Hub repository id (``org/name``)."""
    text = os.fspath(source)
    if Path(text).expanduser().is_dir():
        return False
    return (
        bool(_REPO_ID.fullmatch(text)) and ".." not in text and "--" not in text and not text.endswith(".git")
    )


def adapter_folder(
    source: str | os.PathLike[str], *, revision: str | None = None, files: tuple[str, ...]
) -> Path:
    """The local folder holding an adapter: ``source`` itself, or the Hub snapshot of repository ``source``.

    Args:
        source: A directory, or a Hub repository id (``org/name``) when no such directory exists.
        revision: A branch, tag or commit of the Hub repository; default ``main``. Refused for a directory.
        files: The file names to fetch from the Hub (the adapter's config and weights), nothing else.

    Returns:
        The directory to load from. A Hub snapshot is ``$HF_HOME/hub/models--org--name/snapshots/<commit>``.

    Raises:
        AdapterError: ``revision`` given for a local directory; the repository, revision or network is not
            available (offline: not in the cache). The message names the id and what to do.
    """
    if not is_hub_id(source):
        if revision is not None:
            raise AdapterError(
                f"{os.fspath(source)}: revision {revision!r} applies to a Hub repository id (org/name), not to a "
                "local directory; drop the revision"
            )
        return Path(source)
    return _snapshot(os.fspath(source), revision, files)


def _snapshot(repo_id: str, revision: str | None, files: tuple[str, ...]) -> Path:
    from huggingface_hub import constants, errors, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # A cached snapshot that an interrupted download left short (newer huggingface_hub versions only).
    incomplete = getattr(errors, "IncompleteSnapshotError", LocalEntryNotFoundError)

    at = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    local = f"(no local directory {repo_id!r} exists either)"
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=list(files))
    except (LocalEntryNotFoundError, incomplete) as err:
        how = (
            "HF_HUB_OFFLINE is set, so only the cache is read: download it once online "
            f"(`hf download {repo_id} {' '.join(files)}`, or any loramoe command without HF_HUB_OFFLINE), "
            if constants.HF_HUB_OFFLINE
            else "the Hub could not be reached: check the network, "
        )
        raise AdapterError(
            f"adapter {at} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) {local}; {how}"
            "or give the path of a local adapter directory"
        ) from err
    except GatedRepoError as err:
        raise AdapterError(
            f"adapter {at}: the repository is gated; accept its terms on the Hub and log in (`hf auth login`)"
        ) from err
    except RevisionNotFoundError as err:
        raise AdapterError(f"adapter {at}: the repository has no such revision; check --revision") from err
    except RepositoryNotFoundError as err:
        raise AdapterError(
            f"adapter {at}: no such Hub repository {local}, or it is private (log in with `hf auth login`)"
        ) from err
    except (HfHubHTTPError, OSError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise AdapterError(f"adapter {at}: download failed ({reason}); retry, or use a local copy") from err
    missing = [name for name in files if not (Path(folder) / name).is_file()]
    if missing:
        raise AdapterError(
            f"adapter {at}: the repository has no {', '.join(missing)}; loramoe loads adapters saved as "
            f"{' + '.join(files)} (safetensors only: pickle weights are never downloaded)"
        )
    return Path(folder)
