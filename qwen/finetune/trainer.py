"""The training loop: AdamW, warmup + cosine, accumulation, clipping, mixed precision, DDP/FSDP,
atomic checkpoints with exact resume, and metrics.

Design notes
- The data order is a pure function of (seed, epoch): every rank computes the same global list of
  micro-batches and takes its share, so resuming needs only the step counter and the RNG states,
  and a 2-process run sees exactly the batches a 1-process run with twice the accumulation sees.
- The loss is the mean over every supervised token of the *global* batch (sum of token losses
  divided by the global token count, which every rank can count locally), not a mean of per-batch
  means: accumulation and world size then do not change the gradient.
- The model only has to return logits (``model(input_ids=..., attention_mask=...).logits`` or a
  tuple whose first item is logits); the loss is computed here in fp32.
- DeepSpeed ZeRO (``deepspeed="zero2"|"zero3"|path``, optional) replaces DDP/FSDP and the step, not the
  semantics: same AdamW, schedule, loss normalisation and data order; see :mod:`qwen.finetune.ds`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import checkpoints as ckpt
from ..data import IGNORE_INDEX, Example, collate
from .distributed import DistEnv, all_reduce_sum, any_rank, barrier


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping; defaults follow the official finetune scripts where they exist."""

    output_dir: str
    epochs: float = 1.0
    max_steps: int | None = None  # overrides epochs
    batch_size: int = 2  # micro-batch per process
    grad_accum: int = 8
    lr: float = 3e-4
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    warmup_ratio: float = 0.01
    warmup_steps: int | None = None  # overrides warmup_ratio
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (mixed precision; master weights stay fp32)
    gradient_checkpointing: bool = False
    seed: int = 42
    group_by_length: bool = False
    log_every: int = 1
    eval_every: int | None = None  # steps; None: at the end only (when eval data is given)
    eval_batch_size: int | None = None
    save_every: int | None = None  # steps; None: only on signals
    keep_last: int = 3
    progress: bool = True
    distributed: str = "auto"  # auto (DDP when launched by torchrun) | ddp | fsdp
    trainable_only_checkpoints: bool = True  # LoRA: checkpoint only the parameters being trained
    deepspeed: str | None = None  # zero2 | zero3 | path of a DeepSpeed JSON config (needs deepspeed installed)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    eval_loss: float | None
    tokens: int
    seconds: float
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Schedule, data order, loss


def cosine_schedule(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then a half cosine down to ``min_ratio`` at ``total``.
    (The official DeepSpeed configs replaced the requested cosine by a flat WarmupLR; we do not.)"""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_micro_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int,
                        group_by_length: bool = False) -> list[list[int]]:
    """The global list of micro-batches (example indices) for one epoch, identical on every rank."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        # Sort within windows of 64 batches so batches hold similar lengths (less padding), then
        # shuffle the batches themselves so training does not see a length curriculum.
        window = batch_size * 64
        order = [i for s in range(0, len(order), window)
                 for i in sorted(order[s:s + window], key=lambda i: lengths[i], reverse=True)]
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    if group_by_length:
        perm = torch.randperm(len(batches), generator=g).tolist()
        batches = [batches[i] for i in perm]
    return batches


def supervised_tokens(example: Example) -> int:
    """Tokens that carry loss after the causal shift (labels[1:])."""
    return sum(1 for t in example.labels[1:] if t != IGNORE_INDEX)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of next-token cross-entropies over supervised positions, in fp32."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _logits(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def resolve_precision(precision: str, device: torch.device) -> str:
    """"auto": bf16 mixed precision on GPUs that support it, fp32 on CPU (bf16 is emulated there)."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision must be auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("fp16 mixed precision needs a GPU; use fp32 on CPU")
    return precision


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices; not biases, norm weights or other 1-D parameters."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------------------------
# Trainer


class Trainer:
    """Train ``model`` on tokenized ``train_examples``.

    ``model`` is the module to optimise (a QWenLMHeadModel, a peft model, or any module returning
    logits); only parameters with ``requires_grad`` are trained. ``env`` comes from
    :func:`qwen.finetune.distributed.init_distributed` (default: one process on the model's device).
    """

    def __init__(self, model: nn.Module, train_examples: Sequence[Example], config: TrainConfig, *,
                 pad_id: int, eval_examples: Sequence[Example] | None = None, env: DistEnv | None = None,
                 on_log: Callable[[dict], None] | None = None) -> None:
        if not train_examples:
            raise ValueError("no training examples")
        self.config = config
        self.env = env or DistEnv(device=next(model.parameters()).device)
        self.pad_id = pad_id
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples or [])
        self.on_log = on_log
        self.output = Path(config.output_dir)
        self.ckpt_root = self.output / "checkpoints"
        self.metrics_path = self.output / "metrics.jsonl"
        self.precision = resolve_precision(config.precision, self.env.device)

        self.lengths = [len(e.input_ids) for e in self.train_examples]
        self.micro_per_step = config.grad_accum * self.env.world_size
        first_epoch = epoch_micro_batches(self.lengths, config.batch_size, config.seed, 0, config.group_by_length)
        self.steps_per_epoch = len(first_epoch) // self.micro_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(self.train_examples)} examples are fewer than one optimizer step needs "
                f"(batch {config.batch_size} x accumulation {config.grad_accum} x {self.env.world_size} processes)")
        self.total_steps = config.max_steps or max(1, round(config.epochs * self.steps_per_epoch))
        self.warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * self.total_steps)
        self._epoch_cache: dict[int, list[list[int]]] = {0: first_epoch}

        self.raw_model = model
        if config.gradient_checkpointing:
            target = _unwrap(model)
            if hasattr(target, "gradient_checkpointing_enable"):
                target.gradient_checkpointing_enable()
            if hasattr(target, "enable_input_require_grads") and not all(p.requires_grad for p in model.parameters()):
                target.enable_input_require_grads()  # frozen embeddings (LoRA) would cut the graph
        self.model = self._wrap(model)
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr,
                                           betas=config.adam_betas, eps=config.adam_eps,
                                           foreach=self.env.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: cosine_schedule(s, self.total_steps, self.warmup, config.min_lr_ratio))
        self.ds = None
        if config.deepspeed:  # our AdamW and schedule go into the engine; it replaces the model
            from .ds import DeepSpeedEngine

            self.ds = DeepSpeedEngine(config.deepspeed, model, self.optimizer, self.scheduler,
                                      batch_size=config.batch_size, grad_accum=config.grad_accum,
                                      world_size=self.env.world_size, max_grad_norm=config.max_grad_norm,
                                      precision=self.precision, device=self.env.device,
                                      is_main=self.env.is_main)
            self.model = self.ds.engine
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" and self.ds is None else None
        self.step = 0
        self.tokens_seen = 0
        self._stop_signal: int | None = None

    # -------------------------------------------------------------- setup
    def _wrap(self, model: nn.Module) -> nn.Module:
        mode = self.config.distributed
        if self.config.deepspeed:  # DeepSpeed does its own data parallelism
            if mode == "fsdp":
                raise ValueError("--deepspeed and --distributed fsdp exclude each other (both shard the model)")
            return model
        if not self.env.distributed or mode == "none":
            return model
        if mode in ("auto", "ddp"):
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.env.local_rank] if self.env.device.type == "cuda" else None
            return DDP(model, device_ids=ids)
        if mode == "fsdp":
            return _fully_shard(model, self.precision)
        raise ValueError(f"unknown distributed mode {mode!r} (auto, ddp, fsdp)")

    def _is_fsdp(self) -> bool:
        return self.config.distributed == "fsdp" and self.env.distributed and not self.config.deepspeed

    # -------------------------------------------------------------- data
    def _epoch(self, epoch: int) -> list[list[int]]:
        if epoch not in self._epoch_cache:
            self._epoch_cache = {epoch: epoch_micro_batches(self.lengths, self.config.batch_size, self.config.seed,
                                                            epoch, self.config.group_by_length)}
        return self._epoch_cache[epoch]

    def step_batches(self, step: int) -> list[list[int]]:
        """All micro-batches (every rank's) of optimizer step ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        batches = self._epoch(epoch)
        return batches[i * self.micro_per_step:(i + 1) * self.micro_per_step]

    def _collate(self, idx: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([self.train_examples[i] for i in idx], self.pad_id)
        return {k: v.to(self.env.device) for k, v in batch.items()}

    # -------------------------------------------------------------- forward
    def _forward_loss_sum(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]
        kwargs = {"attention_mask": mask} if not bool(mask.all()) else {}
        with _autocast(self.precision, self.env.device):
            out = model(input_ids=batch["input_ids"], **kwargs)
        return token_loss_sum(_logits(out), batch["labels"])

    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch; returns its metrics."""
        env = self.env
        everyone = self.step_batches(self.step)
        n_tokens = sum(supervised_tokens(self.train_examples[i]) for mb in everyone for i in mb)
        mine = everyone[env.rank::env.world_size]
        self.model.train()
        loss_sum = torch.zeros((), device=env.device)
        lr = self.optimizer.param_groups[0]["lr"]
        for j, idx in enumerate(mine):
            batch = self._collate(idx)
            last = j == len(mine) - 1
            if self.ds is not None:  # reduces over ranks (a mean, like DDP); steps at the last micro-batch
                part = self._forward_loss_sum(self.model, batch)
                self.ds.backward_and_step(part * (env.world_size / max(1, n_tokens)), boundary=last)
                loss_sum += part.detach()
                continue
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                part = self._forward_loss_sum(self.model, batch)
                # DDP averages gradients over ranks, hence the world-size factor.
                scaled = part * (env.world_size / max(1, n_tokens))
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            loss_sum += part.detach()
        if self.ds is not None:
            grad_norm = self.ds.grad_norm()
        else:
            grad_norm = self._optimizer_step()
        total = float(all_reduce_sum(loss_sum, env))
        step_tokens = sum(self.lengths[i] for mb in everyone for i in mb)
        self.step += 1
        self.tokens_seen += step_tokens
        return {"loss": total / max(1, n_tokens), "lr": lr, "grad_norm": grad_norm, "tokens": step_tokens}

    def _optimizer_step(self) -> float:
        """Unscale, clip, step AdamW and the schedule; returns the gradient norm before clipping."""
        cfg = self.config
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = float("nan")
        if cfg.max_grad_norm:
            params = [p for p in self.model.parameters() if p.requires_grad]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example] | None = None) -> float:
        """Token-weighted mean loss over ``examples`` (default: the eval set), sharded over ranks."""
        examples = list(self.eval_examples if examples is None else examples)
        if not examples:
            raise ValueError("no evaluation examples")
        bs = self.config.eval_batch_size or self.config.batch_size
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
        everyone = [order[i:i + bs] for i in range(0, len(order), bs)]
        batches: list[list[int] | None] = list(everyone[self.env.rank::self.env.world_size])
        if self._is_fsdp() or (self.ds is not None and self.ds.stage == 3):
            # sharded parameters are gathered collectively in forward: every rank runs as many forwards,
            # ranks with a batch fewer run a discarded one
            batches += [None] * (-(-len(everyone) // self.env.world_size) - len(batches))
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.env.device)
        for idx in batches:
            batch = collate([examples[i] for i in (idx or everyone[0])], self.pad_id)
            batch = {k: v.to(self.env.device) for k, v in batch.items()}
            loss = float(self._forward_loss_sum(self.model, batch))
            if idx is not None:
                sums[0] += loss
                sums[1] += sum(supervised_tokens(examples[i]) for i in idx)
        self.model.train(was_training)
        sums = all_reduce_sum(sums, self.env)
        return float(sums[0] / max(1.0, float(sums[1])))

    # -------------------------------------------------------------- loop
    def train(self, resume: str | bool | None = None) -> TrainResult:
        cfg, env = self.config, self.env
        if resume:
            self.load_checkpoint(ckpt.find_resume_checkpoint(self.ckpt_root, resume))
        else:
            _seed_everything(cfg.seed + env.rank)
        if env.is_main:
            self.output.mkdir(parents=True, exist_ok=True)
            self._trim_metrics()
        history: list[dict] = []
        eval_loss = None
        bar = self._progress()
        start_time, start_tokens = time.perf_counter(), self.tokens_seen
        last: dict[str, float] = {}
        interrupted = False
        with self._signals():
            while self.step < self.total_steps:
                last = self.train_step()
                elapsed = time.perf_counter() - start_time
                tps = (self.tokens_seen - start_tokens) / max(elapsed, 1e-9)
                record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
                          "loss": round(last["loss"], 6), "lr": last["lr"], "grad_norm": round(last["grad_norm"], 4),
                          "tokens": self.tokens_seen, "tokens_per_s": round(tps, 1), "elapsed_s": round(elapsed, 2)}
                want_eval = self.eval_examples and (
                    (cfg.eval_every and self.step % cfg.eval_every == 0) or self.step == self.total_steps)
                if want_eval:
                    eval_loss = self.evaluate()
                    record["eval_loss"] = round(eval_loss, 6)
                if self.step % cfg.log_every == 0 or want_eval or self.step == self.total_steps:
                    self._log(record)
                    history.append(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{last['lr']:.2e}", tok_s=f"{tps:,.0f}")
                stop = any_rank(self._stop_signal is not None, env)
                if stop or (cfg.save_every and self.step % cfg.save_every == 0):
                    self.save_checkpoint()
                if stop:
                    interrupted = True
                    break
        if bar is not None:
            bar.close()
        if env.is_main and history:
            try:
                from .plot import plot_metrics

                plot_metrics(self.metrics_path, self.output / "loss.png")
            except ImportError as e:  # matplotlib is an optional extra
                print(f"loss curve not drawn ({e}); install matplotlib for {self.output / 'loss.png'}")
        return TrainResult(steps=self.step, final_loss=last.get("loss"), eval_loss=eval_loss,
                           tokens=self.tokens_seen - start_tokens,
                           seconds=time.perf_counter() - start_time, interrupted=interrupted, history=history)

    def _progress(self) -> Any:
        if not (self.config.progress and self.env.is_main):
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True)

    def _log(self, record: dict) -> None:
        if self.on_log is not None:
            self.on_log(record)
        if self.env.is_main:
            with open(self.metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _trim_metrics(self) -> None:
        """On resume, forget metrics logged after the checkpoint so the curve has no duplicates."""
        if not self.metrics_path.exists():
            return
        keep = [line for line in self.metrics_path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= self.step]
        self.metrics_path.write_text("".join(line + "\n" for line in keep))

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM ask for a checkpoint at the end of the current step; a second SIGINT aborts."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signum
            if self.env.is_main:
                print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint after this step "
                      "(Ctrl-C again to abort without saving)", flush=True)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    # -------------------------------------------------------------- checkpoints
    def _model_state(self) -> dict[str, torch.Tensor]:
        """The full state dict (trainable part only for LoRA); collective under FSDP and DeepSpeed."""
        if self.ds is not None:  # rank 0 only
            state = self.ds.full_state_dict(trainable_only=self.config.trainable_only_checkpoints)
        elif self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        else:
            state = _unwrap(self.model).state_dict()
        if self.config.trainable_only_checkpoints:
            trainable = {n for n, p in _unwrap(self.model).named_parameters() if p.requires_grad}
            if len(trainable) < len(list(_unwrap(self.model).parameters())):
                state = {k: v for k, v in state.items() if k in trainable}
        return state

    def _optim_state(self) -> dict:
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(self.model, self.optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return self.optimizer.state_dict()

    def save_checkpoint(self) -> Path | None:
        """Write step ``self.step`` atomically (rank 0 writes; every rank contributes its RNG state)."""
        from safetensors.torch import save_file

        env = self.env
        ds = self.ds
        model_state = self._model_state() if ds is None else None
        optim_state = self._optim_state() if ds is None else None
        stage = None
        if env.is_main:
            stage = ckpt.stage_dir(self.ckpt_root)
        stage = _broadcast_path(stage, env)
        ckpt.save_torch(_rng_state(), stage / f"rng-rank{env.rank}.pt")
        if ds is not None:  # model, optimizer, schedule: every rank's DeepSpeed shards, in stage/deepspeed/
            ds.save(stage, trainable_only=self.config.trainable_only_checkpoints)
        barrier(env)
        final = None
        if env.is_main and ds is None:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
            save_file(_dedupe_shared(tensors), str(stage / "model.safetensors"), metadata={"format": "pt"})
            ckpt.save_torch({"optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                             "scaler": self.scaler.state_dict() if self.scaler else None},
                            stage / "optimizer.pt")
        if env.is_main:
            state = {"epoch": self.step / self.steps_per_epoch, "tokens_seen": self.tokens_seen,
                     "world_size": env.world_size, "total_steps": self.total_steps,
                     "config": _jsonable(asdict(self.config))}
            if ds is not None:
                state["deepspeed_stage"] = ds.stage
            final = ckpt.commit(stage, self.ckpt_root, self.step, state, self.config.keep_last)
            print(f"saved checkpoint {final}", flush=True)
        barrier(env)
        return final

    def load_checkpoint(self, path: Path) -> None:
        """Restore model, optimizer, scheduler, scaler, step and RNG: training continues exactly."""
        state = ckpt.read_state(path)
        cfg = self.config
        saved = state.get("config", {})
        for key in ("batch_size", "grad_accum", "seed", "group_by_length"):
            if key in saved and saved[key] != getattr(cfg, key):
                raise ckpt.CheckpointError(f"cannot resume from {path}: {key} was {saved[key]}, now {getattr(cfg, key)}")
        if state.get("world_size") != self.env.world_size:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: it was written by {state.get('world_size')} processes, this run has "
                f"{self.env.world_size} (the data order depends on it)")
        saved_stage = state.get("deepspeed_stage")
        if saved_stage != (self.ds.stage if self.ds is not None else None):
            was = f"DeepSpeed ZeRO-{saved_stage}" if saved_stage is not None else "a run without DeepSpeed"
            now = f"DeepSpeed ZeRO-{self.ds.stage}" if self.ds is not None else "no DeepSpeed"
            raise ckpt.CheckpointError(f"cannot resume from {path}: it was written by {was}, this run uses {now}")
        if self.ds is not None:
            self.ds.load(path)
        else:
            self._load_model_and_optimizer(path)
        rng_file = path / f"rng-rank{self.env.rank}.pt"
        _set_rng_state(ckpt.load_torch(rng_file))
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if self.env.is_main:
            print(f"resumed from {path} (step {self.step}/{self.total_steps})", flush=True)

    def _load_model_and_optimizer(self, path: Path) -> None:
        from safetensors.torch import load_file

        try:
            weights = load_file(str(path / "model.safetensors"))
        except Exception as e:
            raise ckpt.CheckpointError(f"cannot read {path / 'model.safetensors'}: {e}") from None
        target = _unwrap(self.model)
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(self.model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            missing = [k for k in weights if k not in target.state_dict()]
            if missing:
                raise ckpt.CheckpointError(f"{path}: tensors {missing[:3]} do not belong to this model")
            target.load_state_dict(weights, strict=False)
        opt = ckpt.load_torch(path / "optimizer.pt")
        if self._is_fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(self.model, self.optimizer, opt["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        if self.scaler and opt.get("scaler"):
            self.scaler.load_state_dict(opt["scaler"])


# ---------------------------------------------------------------------------------------------
# helpers


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def _fully_shard(model: nn.Module, precision: str) -> nn.Module:
    """FSDP2: shard every transformer block, then the root (PyTorch's own, no extra dependency)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp else {}
    blocks = [m for m in model.modules() if type(m).__name__ == "QWenBlock"]
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _broadcast_path(path: Path | None, env: DistEnv) -> Path:
    if not env.distributed:
        assert path is not None
        return path
    import torch.distributed as dist

    box = [str(path) if path is not None else None]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses aliased tensors (tied embeddings): keep one name per storage."""
    seen: dict[tuple[int, int], str] = {}
    out = {}
    for k, v in tensors.items():
        key = (v.untyped_storage().data_ptr(), v.storage_offset())
        if key in seen and v.numel() > 0:
            continue
        seen[key] = k
        out[k] = v
    return out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def _rng_state() -> dict:
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
