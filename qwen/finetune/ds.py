"""DeepSpeed ZeRO-2/3 under the Trainer (optional: ``pip install deepspeed==0.19.8``).

Only the parts DeepSpeed is good at are handed to it: sharding (ZeRO stage 2: gradients and optimizer
state; stage 3: parameters too), its data-parallel gradient reduction and its mixed precision. The rest
stays the Trainer's, so a DeepSpeed run computes what a plain run computes:

- The optimizer and the schedule are ours: AdamW and the warmup + cosine LambdaLR are passed to
  ``deepspeed.initialize``. A config's own ``optimizer`` / ``scheduler`` sections are dropped with a
  warning: the official configs carried a ``WarmupLR`` scheduler that silently replaced the requested
  cosine decay, so the learning rate never decayed (QwenLM/Qwen#571).
- Every ``"auto"`` is filled from the TrainConfig (micro-batch, accumulation, global batch, clipping,
  bf16/fp16 from the resolved precision, ZeRO-3 bucket sizes from the hidden size); an explicit value
  that disagrees with the run is an error rather than a silent override.
- The loss keeps the Trainer's normalisation (token sum over the global batch / global supervised-token
  count, times the world size because the reduction averages over ranks, as DDP does):
  ``engine.backward(loss, scale_wrt_gas=False)`` stops DeepSpeed from dividing by the accumulation
  steps a second time. The accumulation boundary is set explicitly on every micro-batch and
  ``engine.step()`` runs after each one; it clips, steps AdamW and the schedule at the boundary only.
- Checkpoints: ``engine.save_checkpoint`` writes every rank's shards into ``deepspeed/`` inside the
  Trainer's staged checkpoint directory, so the atomic rename and the sha256 manifest cover them.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

INSTALL_HINT = "pip install deepspeed==0.19.8  (or: pip install 'qwen[deepspeed]')"
BUILTIN_CONFIGS = {"zero2": "ds_config_zero2.json", "zero3": "ds_config_zero3.json"}
CHECKPOINT_TAG = "deepspeed"  # sub-directory of a training checkpoint holding DeepSpeed's files

# TrainConfig-derived keys, with the flag to change them in the error message.
_FLAGS = {"train_micro_batch_size_per_gpu": "--batch-size", "gradient_accumulation_steps": "--grad-accum",
          "train_batch_size": "--batch-size x --grad-accum x processes", "gradient_clipping": "--max-grad-norm"}


def import_deepspeed() -> Any:
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"--deepspeed needs the deepspeed package ({e}); install it with: {INSTALL_HINT}") from None
    return deepspeed


def load_config(spec: str) -> tuple[dict, Path]:
    """``zero2`` / ``zero3`` (the configs shipped with this package) or the path of a DeepSpeed JSON file."""
    path = Path(__file__).with_name(BUILTIN_CONFIGS[spec]) if spec in BUILTIN_CONFIGS else Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--deepspeed {spec}: not zero2, zero3 or an existing DeepSpeed JSON config file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"--deepspeed {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--deepspeed {path}: expected a JSON object")
    return data, path


def resolve_config(raw: dict, *, batch_size: int, grad_accum: int, world_size: int, max_grad_norm: float | None,
                   precision: str, hidden_size: int | None = None,
                   warn: Callable[[str], None] = print) -> dict:
    """A DeepSpeed config with every "auto" filled from the run and no optimizer / scheduler section."""
    cfg = copy.deepcopy(raw)
    for section in ("optimizer", "scheduler"):
        if section in cfg:
            dropped = cfg.pop(section)
            kind = dropped.get("type", "?") if isinstance(dropped, dict) else "?"
            warn(f"warning: ignoring the DeepSpeed config's {section!r} section ({kind}): qwen train keeps its own "
                 "AdamW (--lr, --weight-decay, --adam-beta2) and warmup + cosine schedule (--warmup-ratio / "
                 "--warmup-steps, --min-lr-ratio). In the official configs a WarmupLR scheduler silently "
                 "replaced the cosine decay, so the learning rate never decayed (QwenLM/Qwen#571).")
    ours = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_accum,
            "train_batch_size": batch_size * grad_accum * world_size,
            "gradient_clipping": float(max_grad_norm or 0.0)}
    for key, value in ours.items():
        given = cfg.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(f"the DeepSpeed config sets {key}={given!r} but this run has {value!r} "
                             f"({_FLAGS[key]}); use \"auto\" there or change the flag")
        cfg[key] = value
    if "bfloat16" in cfg:  # DeepSpeed's alias
        cfg["bf16"] = cfg.pop("bfloat16")
    for name in ("bf16", "fp16"):
        section = cfg.setdefault(name, {})
        want = precision == name
        given = section.get("enabled", "auto")
        if given != "auto" and bool(given) != want:
            raise ValueError(f"the DeepSpeed config sets {name}.enabled={given!r} but this run's precision is "
                             f"{precision} (--precision); use \"auto\" there or change the flag")
        section["enabled"] = want
    zero = cfg.setdefault("zero_optimization", {})
    # The sizes transformers' DeepSpeed integration derives from the hidden size.
    sizes = {} if hidden_size is None else {"reduce_bucket_size": hidden_size * hidden_size,
                                            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                                            "stage3_param_persistence_threshold": 10 * hidden_size}
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            if key in sizes:
                zero[key] = sizes[key]
            else:
                del zero[key]  # DeepSpeed's default
    left = sorted(_auto_keys(cfg))
    if left:
        raise ValueError(f"the DeepSpeed config has \"auto\" values qwen train cannot fill: {', '.join(left)}")
    return cfg


def _auto_keys(obj: Any, prefix: str = "") -> list[str]:
    if isinstance(obj, dict):
        return [k for key, v in obj.items() for k in _auto_keys(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if obj == "auto" else []


def _world_of_one_env() -> None:
    """deepspeed.initialize joins a process group; a plain ``python`` run (no torchrun) has none, so
    describe a world of one on a free local port."""
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)


class DeepSpeedEngine:
    """The Trainer's handle on a ``deepspeed.initialize``-d engine (``.engine`` replaces the model)."""

    def __init__(self, spec: str, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                 batch_size: int, grad_accum: int, world_size: int, max_grad_norm: float | None, precision: str,
                 device: torch.device, is_main: bool) -> None:
        deepspeed = import_deepspeed()
        from deepspeed.accelerator import get_accelerator

        accelerator = get_accelerator().device_name()
        if accelerator != device.type:  # the engine would move the model to its own accelerator
            raise ValueError(f"DeepSpeed runs on {accelerator} but this run trains on {device}; set DS_ACCELERATOR="
                             f"{device.type} (or CUDA_VISIBLE_DEVICES=) so both agree")
        raw, self.source = load_config(spec)
        say = print if is_main else (lambda *a, **k: None)
        config = getattr(model, "config", None)
        self.config = resolve_config(raw, batch_size=batch_size, grad_accum=grad_accum, world_size=world_size,
                                     max_grad_norm=max_grad_norm, precision=precision,
                                     hidden_size=getattr(config, "hidden_size", None), warn=say)
        self.stage = int(self.config["zero_optimization"].get("stage", 0))
        if world_size == 1:
            _world_of_one_env()
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=self.config)
        self.partial = any(not p.requires_grad for p in model.parameters())
        say(f"DeepSpeed ZeRO stage {self.stage} ({self.source})")

    # ------------------------------------------------------------------ training
    def backward_and_step(self, loss: torch.Tensor, boundary: bool) -> None:
        """One micro-batch: ``loss`` is already normalised by the global token count (no division by the
        accumulation steps); the optimizer, clipping and schedule act at the boundary only."""
        self.engine.set_gradient_accumulation_boundary(boundary)
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def grad_norm(self) -> float:
        """The global gradient norm before clipping, of the last optimizer step (NaN when not computed)."""
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    # ------------------------------------------------------------------ state
    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 ({} elsewhere), the trained parameters as their fp32 master copies (the
        module holds bf16/fp16 copies under mixed precision). ``trainable_only``: skip frozen weights.
        Collective: every rank must call it (ZeRO-3 gathers the shards)."""
        from deepspeed.utils import safe_get_full_fp32_param

        import torch.distributed as dist

        main = not dist.is_initialized() or dist.get_rank() == 0
        module = self.engine.module
        if self.stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=trainable_only) or {}
        elif main and not trainable_only:
            state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
        else:
            state = {}
        masters: dict[int, torch.Tensor | None] = {}
        for name, p in module.named_parameters(remove_duplicate=False):  # the same order on every rank
            if not p.requires_grad:
                continue
            if id(p) not in masters:
                full = safe_get_full_fp32_param(p)  # collective under ZeRO-3
                if full is None:  # ZeRO stage 0: the module holds the weights themselves
                    full = p
                masters[id(p)] = full.detach().cpu() if main else None
            if main:
                state[name] = masters[id(p)]
        return state

    def save(self, stage_dir: Path, trainable_only: bool = True) -> None:
        """Collective: each rank writes its model and optimizer shards into ``stage_dir/deepspeed``
        (``trainable_only``: without the frozen weights, e.g. a LoRA base)."""
        self.engine.save_checkpoint(str(stage_dir), tag=CHECKPOINT_TAG, save_latest=False,
                                    exclude_frozen_parameters=trainable_only and self.partial)

    def load(self, path: Path) -> None:
        from .checkpoints import CheckpointError

        loaded, _ = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_module_strict=not self.partial,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise CheckpointError(f"{path}: DeepSpeed could not load {CHECKPOINT_TAG}/")


__all__ = ["DeepSpeedEngine", "BUILTIN_CONFIGS", "load_config", "resolve_config", "import_deepspeed"]
