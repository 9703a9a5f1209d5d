"""Training checkpoints that are either complete or absent.

A checkpoint is a directory ``step-00000120/`` holding the trainable weights (safetensors), the
optimizer/scheduler/scaler state (under DeepSpeed instead: every rank's shards in ``deepspeed/``),
one RNG file per rank and ``trainer_state.json``. It is written into a hidden temp directory and
renamed into place, so a crash mid-write leaves the previous checkpoints untouched.
``trainer_state.json`` lists every file (sub-directories included) with its size and sha256:
resuming from a damaged checkpoint fails with the name of the damaged file instead of silently
restarting.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "trainer_state.json"
_PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A training checkpoint is missing, incomplete or does not match the current run."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp dirs are hidden and skipped)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX):]))


def stage_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))


def commit(stage: Path, root: Path, step: int, state: dict[str, Any], keep_last: int | None) -> Path:
    """Write the manifest, rename ``stage`` to ``step-N`` and drop all but the newest ``keep_last``."""
    files = {}
    for p in sorted(stage.rglob("*")):  # sub-directories too (DeepSpeed's shards live in deepspeed/)
        if p.is_file():
            files[p.relative_to(stage).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    state = dict(state, step=step, files=files)
    tmp = stage / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, ensure_ascii=False))
    os.replace(tmp, stage / STATE_FILE)
    final = root / f"{_PREFIX}{step:08d}"
    if final.exists():  # re-saving the same step (e.g. a signal right after a periodic save)
        shutil.rmtree(final)
    os.replace(stage, final)
    if keep_last is not None and keep_last > 0:
        for old in checkpoint_dirs(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """``trainer_state.json`` of ``ckpt``, after checking every listed file's size and hash."""
    state_path = ckpt / STATE_FILE
    if not state_path.exists():
        raise CheckpointError(f"{ckpt} is not a training checkpoint (no {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{state_path} is corrupted: {e}") from None
    if verify:
        for name, meta in state.get("files", {}).items():
            p = ckpt / name
            if not p.exists():
                raise CheckpointError(f"checkpoint {ckpt} is incomplete: {name} is missing")
            size = p.stat().st_size
            if size != meta["bytes"]:
                raise CheckpointError(f"checkpoint file {p} is damaged: {size} bytes, expected {meta['bytes']}")
            if _sha256(p) != meta["sha256"]:
                raise CheckpointError(f"checkpoint file {p} is damaged: sha256 does not match the manifest")
    return state


def find_resume_checkpoint(root: Path, resume: str | os.PathLike | bool) -> Path:
    """The checkpoint ``--resume`` names: a directory, or the newest one under ``root``."""
    if resume is True or str(resume) in ("auto", "latest", "True"):
        found = checkpoint_dirs(root)
        if not found:
            raise CheckpointError(f"--resume: no checkpoint to resume from in {root}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"--resume: {path} is not a directory")
    return path


def save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)


def load_torch(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # a truncated or garbled pickle: name the file
        raise CheckpointError(f"cannot read checkpoint file {path}: {e}") from None
