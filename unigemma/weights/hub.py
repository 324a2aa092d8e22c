"""Models by hub id: "ORG/NAME" → a local checkpoint, through huggingface_hub's cache.

    resolve("google/gemma-4-12B-it")              → .../models--google--gemma-4-12B-it/snapshots/<sha>
    resolve("ggml-org/gemma-3-1b-it-GGUF:Q4_K_M")  → .../snapshots/<sha>/gemma-3-1b-it-Q4_K_M.gguf
    resolve("path/that/exists")                    → that path, untouched

The form: ORG/NAME[:FILE.gguf | :QUANT][@REVISION]. A `:QUANT` tag picks the repository's one
.gguf whose name ends in that tag (case-insensitive), as llama.cpp's `-hf` and Ollama's `hf.co/`
names do; `:FILE.gguf` names the file. Without a tag only what unigemma loads is fetched
(`CHECKPOINT_FILES`: config, safetensors and their index, tokenizer, chat template, generation
config), never the repository's other formats. Downloads go into the hub cache with its
progress bars; with HF_HUB_OFFLINE=1 only the cache is read. The hub's endpoint, cache directory,
token and offline switch are huggingface_hub's own settings (HF_ENDPOINT, HF_HUB_CACHE, HF_TOKEN,
HF_HUB_OFFLINE): nothing here names a host. `cached()` lists what the cache holds (`unigemma ls`).
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

# what weights/sources.py and processing/tokenizer.py read from a checkpoint directory
CHECKPOINT_FILES = ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                    "tokenizer_config.json", "chat_template.jinja", "chat_template.json", "generation_config.json"]
# a hub repo id (the hub's own rules: huggingface_hub.utils.validate_repo_id), a tag, a revision
_REF = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96})(?::(?P<tag>[^:@/]+))?(?:@(?P<revision>[^:@]+))?")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    tag: str | None = None  # "FILE.gguf" or a quant tag such as "Q4_K_M"
    revision: str | None = None  # a branch, tag or commit; None: the default branch

    def __str__(self) -> str:
        return self.repo_id + (f":{self.tag}" if self.tag else "") + (f"@{self.revision}" if self.revision else "")


def parse(model: str | os.PathLike) -> HubRef | None:
    """The hub id `model` spells, or None when it is a local path (one that exists, or any
    that starts like a path: '/', '.', '~', or has more than one '/')."""
    text = os.fspath(model)
    if Path(text).exists() or text.startswith(("/", ".", "~")):
        return None
    m = _REF.fullmatch(text)
    if m is None or "--" in m["repo"] or ".." in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return HubRef(m["repo"], m["tag"], m["revision"])


def resolve(model: str | os.PathLike, files: list[str] | None = None) -> str | os.PathLike:
    """A local path for `model`: itself when it is one, else its hub snapshot (downloaded if
    needed and allowed; CheckpointError naming the model when it cannot be had). files: the
    patterns to fetch of a safetensors checkpoint (default `CHECKPOINT_FILES`)."""
    ref = parse(model)
    return model if ref is None else fetch(ref, files)


def _hub():
    # imported on first use: a local checkpoint never needs it
    import huggingface_hub
    from huggingface_hub import constants, errors

    return huggingface_hub, constants, errors


def offline() -> bool:
    """HF_HUB_OFFLINE, as huggingface_hub read it (at import), or as set in the environment since."""
    _, constants, _ = _hub()
    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def cache_dir() -> str:
    _, constants, _ = _hub()
    return constants.HF_HUB_CACHE


def fetch(ref: HubRef, files: list[str] | None = None) -> Path:
    """Download (or, offline, find) `ref` in the hub cache; the checkpoint directory or .gguf file."""
    hub, _, errors = _hub()
    gguf = ref.tag is not None
    if gguf and ref.tag.lower().endswith(".gguf"):
        patterns = [ref.tag]
    elif gguf:  # a quant tag: which file is known only from a listing (offline: of the files downloaded)
        patterns = [_pick_gguf(_cached_files(ref) if offline() else _listing(ref), ref)]
    else:
        patterns = files or CHECKPOINT_FILES
    try:
        folder = Path(hub.snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns,
                                            cache_dir=cache_dir(), local_files_only=offline()))
    except errors.IncompleteSnapshotError:
        raise CheckpointError(f"{ref}: the cached copy lacks some of its files and the hub is not reachable (or "
                              f"HF_HUB_OFFLINE is set): run `unigemma pull {ref}` with network access") from None
    except errors.LocalEntryNotFoundError as e:
        if offline():
            raise _not_cached(ref) from None
        raise CheckpointError(f"{ref}: cannot reach the hub and it is not cached ({cache_dir()}): {e}") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise CheckpointError(f"{ref}: not a local path, and no such model on the hub (or it needs a token with "
                              f"access: `hf auth login` or HF_TOKEN): {type(e).__name__}") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{ref}: the model has no revision {ref.revision!r}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{ref}: download failed: {type(e).__name__}: {e}") from None
    if not gguf:
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{ref} has no config.json (a GGUF repository? name its file: "
                                  f"{ref.repo_id}:FILE.gguf or a quant tag such as :Q4_K_M)")
        return folder
    path = folder / patterns[0]
    if not path.is_file():
        raise CheckpointError(f"{ref}: {patterns[0]} is not in the repository" +
                              (" (or not cached, and HF_HUB_OFFLINE is set)" if offline() else ""))
    return path


def _listing(ref: HubRef) -> list[str]:
    hub, _, errors = _hub()
    try:
        return hub.list_repo_files(ref.repo_id, revision=ref.revision)
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise CheckpointError(f"{ref}: no such model on the hub, or it needs a token with access: "
                              f"{type(e).__name__}") from None
    except (errors.HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"{ref}: cannot list the repository's files: {type(e).__name__}: {e}") from None


def _cached_files(ref: HubRef) -> list[str]:
    """The files of `ref`'s revision that are in the cache (what `scan_cache_dir` finds)."""
    hub, constants, _ = _hub()
    root = Path(cache_dir())
    repos = hub.scan_cache_dir(root).repos if root.is_dir() else ()
    for repo in repos:
        if repo.repo_id == ref.repo_id and repo.repo_type == "model":
            for rev in repo.revisions:
                if (ref.revision or constants.DEFAULT_REVISION) in rev.refs or rev.commit_hash == ref.revision:
                    return [str(f.file_path.relative_to(rev.snapshot_path)) for f in rev.files]
    raise _not_cached(ref)


def _not_cached(ref: HubRef) -> CheckpointError:
    return CheckpointError(f"{ref} is not a local path, nor in the hub cache ({cache_dir()}), and HF_HUB_OFFLINE is "
                           f"set: run `unigemma pull {ref}` with network access first")


def _pick_gguf(names: list[str], ref: HubRef) -> str:
    """The one model .gguf whose name ends in the quant tag (…-Q4_K_M.gguf, ….q8_0.gguf);
    image/audio projector files (mmproj-*) are never the model."""
    tag = ref.tag.lower()
    found = [n for n in names if fnmatch.fnmatch(n.lower(), f"*[-_.]{tag}.gguf")
             and not Path(n).name.lower().startswith("mmproj")]
    if len(found) == 1:
        return found[0]
    ggufs = sorted(n for n in names if n.lower().endswith(".gguf"))
    if not found:
        raise CheckpointError(f"{ref}: no .gguf file for {ref.tag!r}" +
                              (f"; the repository has {', '.join(ggufs)}" if ggufs else " (the repository has none)"))
    raise CheckpointError(f"{ref}: {len(found)} files match {ref.tag!r} ({', '.join(sorted(found))}): "
                          f"name one as {ref.repo_id}:FILE.gguf")


@dataclass(frozen=True)
class Cached:
    repo_id: str
    size_bytes: int
    size: str  # as huggingface_hub writes it: "1.2G"
    refs: tuple[str, ...]  # branches/tags that point into the cache ("main")
    path: Path  # the newest snapshot


def cached() -> list[Cached]:
    """The models in the hub cache, by repo id (huggingface_hub's `scan_cache_dir`)."""
    hub, _, _ = _hub()
    if not Path(cache_dir()).is_dir():
        return []
    info = hub.scan_cache_dir(cache_dir())
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id.lower()):
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        refs = tuple(sorted(ref for rev in repo.revisions for ref in rev.refs))
        out.append(Cached(repo.repo_id, repo.size_on_disk, repo.size_on_disk_str, refs, Path(newest.snapshot_path)))
    return out
