"""Where models come from: local directories only (this package never downloads).

``qwen-demo`` names the small chat model shipped inside the package (see docs/demo-model.md).
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_MODEL_NAME = "qwen-demo"
DEMO_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "demo"


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    """Root of what qwen builds or fetches for itself: ``$QWEN_CACHE_DIR``, default ``~/.cache/qwen``."""
    return Path(os.environ.get("QWEN_CACHE_DIR", Path.home() / ".cache" / "qwen"))


def demo_model_available() -> bool:
    return (DEMO_MODEL_DIR / "config.json").exists()


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """A local directory (or file) for ``name_or_path``; ``qwen-demo`` maps to the embedded model."""
    name = os.fspath(name_or_path)
    if name == DEMO_MODEL_NAME:
        if not demo_model_available():
            raise ModelNotFoundError(
                "the embedded demo model 'qwen-demo' is not part of this build yet; point to a checkpoint "
                "directory instead (e.g. --model /path/to/Qwen-7B-Chat), or make a random test model with "
                "`qwen init --preset tiny DIR`"
            )
        return str(DEMO_MODEL_DIR)
    path = os.path.expanduser(name)
    if not os.path.exists(path):
        hint = ""
        if "/" in name and not name.startswith((".", "/", "~")):
            hint = (" (it looks like a hub id: this package never downloads; fetch the checkpoint yourself, "
                    "e.g. with `huggingface-cli download`, and pass the local directory)")
        raise ModelNotFoundError(f"model path {name!r} does not exist{hint}")
    return path
