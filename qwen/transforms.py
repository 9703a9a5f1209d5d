"""Extension points of the core: load/save transforms, decode steps and model methods, registered from outside.

The core (config, model, cache, generate, sampling, checkpoint) knows no adapter. ``load_model`` is
read config -> build on the meta device -> load tensors -> finish, and at each stage it calls every
registered :class:`LoadTransform` (GPTQ layers, the int8 lm_head, CPU weight packing, LoRA adapter
directories, ...). ``QWenModel.forward`` asks the registered decode-step providers for a faster
implementation of one decode step (the fused C step of qwen/kernels). ``QWenLMHeadModel`` looks up
methods it does not define itself (``chat``, ``chat_stream``) here.

Who registers: each extension module defines its objects; the composition root, ``qwen/__init__.py``
(the package's first module to run), lists them as ``"module:attribute"`` strings, imported on first
use so that ``import qwen`` stays light. Third-party code may register more with the same calls.
See docs/architecture.md for the layer picture.
"""

from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

_lock = threading.Lock()
_pending: dict[str, list[str]] = {"load": [], "decode": [], "method": []}
_load: list["LoadTransform"] = []
_decode: list[Any] = []
_methods: dict[str, Callable[..., Any]] = {}
_method_specs: dict[str, str] = {}


@dataclass
class LoadContext:
    """What a load transform sees: the checkpoint, its config, the placement and dtype chosen so far,
    the ``from_pretrained`` options the transforms own, and a scratch dict per transform."""

    path: str
    config: Any
    options: dict[str, Any]
    dtype: Any = None
    dtype_given: bool = False  # the caller asked for a dtype (torch_dtype, bf16, fp16, fp32)
    placement: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def all_on_cpu(self) -> bool:
        return all(getattr(d, "type", "cpu") == "cpu" for d in self.placement.values())


class LoadTransform:
    """One stage-wise extension of ``load_model``/``save_model``; every hook is optional.

    ``options`` maps the ``from_pretrained`` keyword arguments this transform owns to their defaults.
    ``order`` sorts the ``finish`` hooks (lower first)."""

    name = "transform"
    options: dict[str, Any] = {}
    order = 50

    def load_instead(self, path: str, kwargs: dict[str, Any]) -> Any:
        """A model for ``path`` loaded some other way (e.g. a LoRA adapter directory), or None."""
        return None

    def configure(self, ctx: LoadContext) -> None:
        """After config.json is read and the dtype chosen: read extra files, adjust ``ctx.dtype``."""

    def install(self, ctx: LoadContext, model: Any) -> None:
        """On the meta model, before its tensors are allocated: swap modules."""

    def load_targets(self, ctx: LoadContext, model: Any) -> dict[str, Any]:
        """Extra tensors (name -> tensor to read into) beyond the model's parameters."""
        return {}

    def check_tensor(self, ctx: LoadContext, file: str, name: str, dtype: Any) -> None:
        """Validate a checkpoint tensor that this transform's ``load_targets`` named (raise to refuse)."""

    def after_tensors(self, ctx: LoadContext, model: Any, loaded: set[str]) -> set[str]:
        """After the tensors are read: fill optional ones; returns the names it filled in."""
        return set()

    def explain_unexpected(self, ctx: LoadContext, names: list[str]) -> str | None:
        """An error message when the checkpoint's unexpected tensors mean a wrong config (strict loads)."""
        return None

    def finish(self, ctx: LoadContext, model: Any) -> None:
        """On the loaded model, in ``order``: repack, replace or prepare modules for inference."""

    # ---- save_model
    def saved_state(self, model: Any) -> tuple[set[str], Any] | None:
        """(state_dict keys to write in their own dtype, the dtype for everything else) or None."""
        return None

    def write_files(self, model: Any, directory: str) -> None:
        """Extra files next to the weights (written into the staging directory)."""

    def refuse_save(self, model: Any) -> str | None:
        """A reason this model must not be saved, or None."""
        return None


# ------------------------------------------------------------------------------------------ registry
def register_load_transform(transform: "LoadTransform | str") -> None:
    """Add a load transform (an instance, or "module:attribute" imported on first use)."""
    with _lock:
        if isinstance(transform, str):
            _pending["load"].append(transform)
        else:
            _load.append(transform)


def register_decode_step(provider: Any) -> None:
    """Add a decode-step provider: ``provider(model, x, cache, mask, output_hidden_states)`` returns a
    callable ``step(x, cos, sin, logn, cache) -> x`` for this step, or None (the blocks run)."""
    with _lock:
        (_pending["decode"] if isinstance(provider, str) else _decode).append(provider)


def register_method(name: str, function: "Callable[..., Any] | str") -> None:
    """A method of QWenLMHeadModel defined outside the core (``model.chat(...)`` -> ``function(model, ...)``)."""
    with _lock:
        if isinstance(function, str):
            _method_specs[name] = function
        else:
            _methods[name] = function


def _resolve(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def _flush(kind: str, into: list[Any]) -> None:
    if _pending[kind]:
        with _lock:
            specs, _pending[kind] = _pending[kind], []
        resolved = [_resolve(s) for s in specs]
        with _lock:
            into.extend(resolved)


def load_transforms() -> list[LoadTransform]:
    _flush("load", _load)
    return list(_load)


def decode_step_providers() -> list[Any]:
    _flush("decode", _decode)
    return list(_decode)


def method(name: str) -> Callable[..., Any] | None:
    fn = _methods.get(name)
    if fn is None and name in _method_specs:
        fn = _methods[name] = _resolve(_method_specs[name])
    return fn


__all__ = ["LoadContext", "LoadTransform", "register_load_transform", "register_decode_step", "register_method",
           "load_transforms", "decode_step_providers", "method"]
