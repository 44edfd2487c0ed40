"""The stage cache: content-addressed artifact folders that are complete only once `manifest.json` exists."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from teams_rl.errors import TeamsRLError

MANIFEST = "manifest.json"

# Names of keys that change how a result is computed but never what it is, wherever they appear; they stay
# out of fingerprints so that e.g. raising a budget or the concurrency resumes the same artifact instead of
# starting a new one. Keys that are run-only for one stage only are in its `Stage.run_only_keys`.
RUN_ONLY_NAMES = frozenset(
    {"max_concurrency", "timeout_s", "max_retries", "budget", "progress", "api_key_env", "num_workers",
     "device", "wandb", "backoff_base_s", "backoff_max_s", "max_retry_after_s", "max_requests_per_s"}
)


_ABSENT = object()


def _strip(node):
    if isinstance(node, dict):
        return {k: _strip(v) for k, v in sorted(node.items()) if k not in RUN_ONLY_NAMES}
    if isinstance(node, list):
        return [_strip(v) for v in node]
    return node


def expand_keys(cfg: DictConfig, keys: Iterable[str], run_only: Iterable[str] = (), stage: str = "?") -> list[str]:
    """The dotted keys a fingerprint is made of: each of `keys`, except that a node holding one of the
    `run_only` keys is replaced by its children (recursively) without it and without `RUN_ONLY_NAMES`.
    A key the config does not have is an error: a misspelt key would otherwise slice nothing."""
    run_only = tuple(run_only)
    out: list[str] = []
    for key in keys:
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            raise TeamsRLError(f"stage '{stage}': config key '{key}' is not in the config")
        if key in run_only:
            continue
        if not any(r.startswith(key + ".") for r in run_only):
            out.append(key)
            continue
        node = OmegaConf.select(cfg, key)
        children = [f"{key}.{child}" for child in node if child not in RUN_ONLY_NAMES] \
            if isinstance(node, DictConfig) else []
        out.extend(expand_keys(cfg, children, run_only, stage))
    return out


def config_slice(cfg: DictConfig, keys: Iterable[str]) -> dict:
    """The resolved values of the dotted `keys`, without run-only keys."""
    out = {}
    for key in keys:
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, DictConfig) or OmegaConf.is_list(value):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = _strip(value)
    return out


def fingerprint(stage: str, version: int | str, slice_: dict, input_fingerprints: dict[str, str]) -> str:
    payload = {"stage": stage, "version": version, "config": slice_, "inputs": dict(sorted(input_fingerprints.items()))}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_hash(path: str | Path) -> str | None:
    """sha256 of a file, or of every file under a folder (relative names included); None if missing."""
    path = Path(path).expanduser()
    if not path.exists():
        return None
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode())
        with open(file, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def write_json_atomic(path: Path, data) -> None:
    """Write JSON so that readers see either the old file or the whole new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


class ArtifactStore:
    """`root/<stage>/<fingerprint>/`; a folder without a manifest is unfinished work, never a result."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def lock_path(self, stage: str, fp: str) -> Path:
        return self.root / stage / f".{fp}.lock"

    def load_manifest(self, stage: str, fp: str) -> dict | None:
        path = self.folder(stage, fp) / MANIFEST
        if not path.is_file():
            return None
        with open(path) as fh:
            return json.load(fh)

    def prepare(self, stage: str, fp: str, resumable: bool) -> Path:
        """Return the folder to write into: kept as-is for a resumable stage, emptied otherwise."""
        folder = self.folder(stage, fp)
        if folder.exists() and not resumable:
            shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def commit(self, stage: str, fp: str, manifest: dict) -> None:
        write_json_atomic(self.folder(stage, fp) / MANIFEST, manifest)
