"""``finetune()``: checkpoint + data in, trained checkpoint or LoRA adapter out (the Python API
behind ``qwen train``). Methods: ``full``, ``lora`` and ``qlora`` (LoRA over a frozen quantized base:
a GPTQ checkpoint, or a full-precision one quantized by bitsandbytes with ``quantize``; see
qwen/finetune/qlora.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from .trainer import TrainConfig, Trainer, TrainResult


@dataclass
class FinetuneOptions:
    model: str
    data: Sequence[str]
    output_dir: str
    method: str = "lora"  # full | lora | qlora
    quantize: str | None = None  # qlora over a full-precision checkpoint: nf4 | fp4 | int8-bnb (bitsandbytes)
    eval_data: Sequence[str] = ()
    max_len: int = 512
    label_mask: str = "assistant"  # assistant | official
    system: str | None = None
    packing: bool = False
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("c_attn", "c_proj", "w1", "w2")
    lora_train_embeddings: bool | None = None  # None: decided by the checkpoint's chat_format
    resume: str | bool | None = None
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields


def default_lr(method: str) -> float:
    """The official scripts' learning rates: 1e-5 for full fine-tuning, 3e-4 for LoRA and Q-LoRA."""
    return 1e-5 if method == "full" else 3e-4


def finetune(opts: FinetuneOptions) -> TrainResult:
    """Load, tokenize (all problems reported before training starts), train, save."""
    from ..checkpoint import load_model
    from ..tokenizer import QWenTokenizer
    from ..data import load_dataset
    from .distributed import init_distributed, shutdown

    if opts.method not in ("full", "lora", "qlora"):
        raise ValueError(f"--method must be full, lora or qlora, got {opts.method!r}")
    if opts.quantize is not None and opts.method != "qlora":
        raise ValueError("--quantize (bitsandbytes quantization of the base) applies to --method qlora only")
    train_kw = dict(opts.train)
    train_kw.setdefault("lr", default_lr(opts.method))
    config = TrainConfig(output_dir=opts.output_dir, **train_kw)
    if opts.method == "qlora":
        _check_qlora_scale_out(config)
    env = init_distributed()
    say = print if env.is_main else (lambda *a, **k: None)

    tokenizer = QWenTokenizer.from_pretrained(opts.model)
    data = load_dataset(list(opts.data), tokenizer, max_len=opts.max_len, label_mask=opts.label_mask,
                        system=opts.system, packing=opts.packing, progress=env.is_main)
    say(f"train data: {data.report()}")
    eval_examples = None
    if opts.eval_data:
        eval_data = load_dataset(list(opts.eval_data), tokenizer, max_len=opts.max_len, label_mask=opts.label_mask,
                                 system=opts.system, packing=False, progress=False)
        say(f"eval data: {eval_data.report()}")
        eval_examples = eval_data.examples

    # Master weights in fp32; a (Q-)LoRA base on GPU can stay in half precision (it is frozen).
    half = config.precision in ("bf16", "fp16", "auto") and env.device.type == "cuda"
    base_dtype = torch.float32
    if opts.method in ("lora", "qlora") and half:
        base_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if opts.method == "qlora":  # a GPTQ checkpoint as it is, or bitsandbytes over a float one
        from .qlora import load_quantized_base

        model = load_quantized_base(opts.model, quantize=opts.quantize, device=str(env.device),
                                    torch_dtype=base_dtype, progress=env.is_main)
    else:
        model = load_model(opts.model, device=str(env.device), torch_dtype=base_dtype, cpu_packed_weights=False,
                           progress=env.is_main)
    model.config.use_cache = False
    trained: torch.nn.Module = model
    if opts.method in ("lora", "qlora"):
        from .lora import LoraSettings, apply_lora

        settings = LoraSettings(r=opts.lora_r, alpha=opts.lora_alpha, dropout=opts.lora_dropout,
                                target_modules=tuple(opts.lora_targets), train_embeddings=opts.lora_train_embeddings)
        torch.manual_seed(config.seed)  # lora_A's random init: the same adapters for the same --seed
        trained = apply_lora(model, settings)
        for p in trained.parameters():  # adapters train in fp32 even over a half-precision base
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()

    trainer = Trainer(trained, data.examples, config, pad_id=tokenizer.eod_id, eval_examples=eval_examples, env=env)
    say(f"{trainer.total_steps} optimizer steps ({trainer.steps_per_epoch}/epoch), global batch "
        f"{config.batch_size * config.grad_accum * env.world_size}, precision {trainer.precision}")
    try:
        result = trainer.train(resume=opts.resume)
        if not result.interrupted:
            export(trainer, opts, model, tokenizer)
            say(f"saved {'model' if opts.method == 'full' else 'adapter'} to {opts.output_dir}")
        return result
    finally:
        shutdown(env)


def export(trainer: Trainer, opts: FinetuneOptions, model: Any, tokenizer: Any) -> None:
    """Final weights: the official checkpoint layout (full) or a peft adapter directory (LoRA, Q-LoRA:
    base_model_name_or_path is the --model directory, the quantized checkpoint for GPTQ)."""
    from ..checkpoint import save_model
    from .distributed import barrier

    env = trainer.env
    # Sharded weights (FSDP, DeepSpeed ZeRO-3) are gathered to rank 0 first (every rank takes part); under
    # DeepSpeed the trained parameters are read from its fp32 master copies (the module may hold bf16).
    gather = trainer._is_fsdp() or trainer.ds is not None
    if opts.method in ("lora", "qlora"):
        state = trainer._model_state() if trainer.ds is not None else None
        if env.is_main:
            from .lora import save_adapter

            save_adapter(trainer.raw_model, opts.output_dir, base_model_path=str(Path(opts.model).resolve()),
                         state_dict=state)
    else:
        state = trainer._model_state() if gather else None
        if env.is_main:
            if state is not None:
                model = _rebuild_from_state(model, state)
            save_model(model, opts.output_dir, tokenizer=tokenizer)
    barrier(env)


def _check_qlora_scale_out(config: TrainConfig) -> None:
    """Sharding the frozen quantized base is not supported (as the official finetune.py warned: FSDP and
    ZeRO-3 are incompatible with Q-LoRA). DDP and ZeRO-2 keep whole models on each rank."""
    if config.distributed == "fsdp" and not config.deepspeed:
        raise ValueError("--method qlora cannot shard the quantized base with --distributed fsdp; use DDP "
                         "(the default under torchrun) or --deepspeed zero2")
    if config.deepspeed:
        from .ds import load_config

        raw, _ = load_config(config.deepspeed)
        if int((raw.get("zero_optimization") or {}).get("stage", 0)) == 3:
            raise ValueError("--method qlora cannot shard the quantized base with DeepSpeed ZeRO-3; use zero2")


def _rebuild_from_state(model: Any, state: dict[str, torch.Tensor]) -> Any:
    """A plain CPU copy of a sharded (FSDP, DeepSpeed) model, filled from its gathered full state dict."""
    from ..model import QWenLMHeadModel

    plain = QWenLMHeadModel(model.config)
    plain.load_state_dict(state, strict=False)
    plain.generation_config = model.generation_config
    return plain


__all__ = ["FinetuneOptions", "finetune", "default_lr"]
