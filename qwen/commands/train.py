"""``qwen train``: full, LoRA or Q-LoRA fine-tuning (and pretraining on plain text) of a Qwen checkpoint.

Single process:   qwen train --model DIR --data train.json --method lora --output out/
Q-LoRA:           qwen train --model Qwen-7B-Chat-Int4 --data train.json --method qlora --output out/
                  qwen train --model Qwen-7B-Chat --quantize nf4 --data train.json --method qlora --output out/
Data parallel:    torchrun --nproc_per_node 4 -m qwen train --model DIR --data train.json --output out/
Sharded (FSDP):   torchrun --nproc_per_node 8 -m qwen train ... --method full --distributed fsdp
DeepSpeed ZeRO:   torchrun --nproc_per_node 8 -m qwen train ... --deepspeed zero3   (pip install deepspeed==0.19.8)
Multi-node:       the same with torchrun's --nnodes/--node-rank/--rdzv-endpoint flags.
The demo model:   qwen train --recipe demo   (see docs/demo-model.md)
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", choices=["demo"], help="run a built-in recipe instead (demo: build the embedded "
                   "demo chat model; other flags are passed to the recipe, see `qwen train --recipe demo --help`)")
    p.add_argument("--model", help="checkpoint directory to start from")
    p.add_argument("--data", nargs="+", help="training files: official SFT JSON/JSONL "
                   "({'conversations': [{'from', 'value'}]}), {'text': ...} JSONL or plain text")
    p.add_argument("--output", help="output directory (checkpoints/, metrics.jsonl, loss.png, final weights)")
    p.add_argument("--method", choices=["full", "lora", "qlora"], default="lora",
                   help="default lora; qlora: LoRA over a frozen quantized base (a GPTQ checkpoint, or --quantize)")
    p.add_argument("--quantize", choices=["nf4", "fp4", "int8-bnb"], default=None,
                   help="qlora on a full-precision --model: quantize its block linears with bitsandbytes at load "
                   "time (NF4, FP4 or LLM.int8); not needed for GPTQ (-Int4/-Int8) checkpoints")
    p.add_argument("--eval-data", nargs="+", default=[], help="held-out files for eval loss")

    d = p.add_argument_group("data")
    d.add_argument("--max-len", type=int, default=512, help="tokens per sample; longer samples are truncated and "
                   "counted in the report (official: model_max_length 512)")
    d.add_argument("--label-mask", choices=["assistant", "official"], default="assistant",
                   help="assistant: loss on assistant replies and their <|im_end|> (default); official: "
                   "finetune.py's masking exactly (docs/finetuning.md)")
    d.add_argument("--system", default=None, help="system prompt for samples without one")
    d.add_argument("--packing", action="store_true", help="pack several samples per row (default: dynamic padding)")
    d.add_argument("--group-by-length", action="store_true", help="batch samples of similar length (less padding)")

    o = p.add_argument_group("optimisation (defaults as the official finetune scripts)")
    o.add_argument("--epochs", type=float, default=5.0)
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=2, help="micro-batch per process (default 2)")
    o.add_argument("--grad-accum", type=int, default=8, help="gradient accumulation steps (default 8)")
    o.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-5 full, 3e-4 LoRA)")
    o.add_argument("--min-lr-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    o.add_argument("--warmup-ratio", type=float, default=0.01)
    o.add_argument("--warmup-steps", type=int, default=None)
    o.add_argument("--weight-decay", type=float, default=0.1)
    o.add_argument("--adam-beta2", type=float, default=0.95)
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    o.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="auto: bf16 mixed precision on GPU, fp32 on CPU")
    o.add_argument("--gradient-checkpointing", action="store_true")
    o.add_argument("--seed", type=int, default=42)

    lo = p.add_argument_group("LoRA and Q-LoRA (official defaults)")
    lo.add_argument("--lora-r", type=int, default=64)
    lo.add_argument("--lora-alpha", type=int, default=16)
    lo.add_argument("--lora-dropout", type=float, default=0.05)
    lo.add_argument("--lora-targets", default="c_attn,c_proj,w1,w2", help="comma-separated module names")
    lo.add_argument("--lora-train-embeddings", choices=["auto", "yes", "no"], default="auto",
                    help="also train wte and lm_head; auto: yes for base models (chat_format raw), as the official")

    r = p.add_argument_group("checkpoints, logging, scale-out")
    r.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps (and always on SIGINT/SIGTERM)")
    r.add_argument("--keep-last", type=int, default=3, help="keep the newest K checkpoints")
    r.add_argument("--eval-every", type=int, default=None, help="eval every N steps (default: at the end)")
    r.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the newest checkpoint in --output (or from the given directory)")
    r.add_argument("--distributed", choices=["auto", "ddp", "fsdp"], default="auto",
                   help="under torchrun: ddp (default) or fsdp (shards parameters, gradients, optimizer state)")
    r.add_argument("--deepspeed", metavar="zero2|zero3|CONFIG.json", default=None,
                   help="DeepSpeed ZeRO instead of DDP/FSDP: the bundled zero2 / zero3 config or a DeepSpeed JSON "
                   "file; its \"auto\" values are filled from these flags and its optimizer/scheduler sections are "
                   "ignored (AdamW + warmup/cosine stay ours). Needs: pip install deepspeed==0.19.8")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--recipe" in argv:
        i = argv.index("--recipe")
        name = argv[i + 1] if i + 1 < len(argv) else ""
        if name == "demo":
            from ..finetune.demo.recipe import main as recipe_main

            return recipe_main(argv[:i] + argv[i + 2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag in ("model", "data", "output"):
        if not getattr(args, flag):
            parser.error(f"--{flag} is required")

    from ..finetune.checkpoints import CheckpointError
    from ..data import DataError
    from ..finetune.run import FinetuneOptions, finetune

    train = dict(epochs=args.epochs, max_steps=args.max_steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                 min_lr_ratio=args.min_lr_ratio, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps,
                 weight_decay=args.weight_decay, adam_betas=(0.9, args.adam_beta2),
                 max_grad_norm=args.max_grad_norm or None, precision=args.precision,
                 gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
                 group_by_length=args.group_by_length, eval_every=args.eval_every, save_every=args.save_every,
                 keep_last=args.keep_last, progress=not args.no_progress, distributed=args.distributed,
                 deepspeed=args.deepspeed)
    if args.lr is not None:
        train["lr"] = args.lr
    embeddings = {"auto": None, "yes": True, "no": False}[args.lora_train_embeddings]
    opts = FinetuneOptions(model=args.model, data=args.data, output_dir=args.output, method=args.method,
                           quantize=args.quantize,
                           eval_data=args.eval_data, max_len=args.max_len, label_mask=args.label_mask,
                           system=args.system, packing=args.packing, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
                           lora_dropout=args.lora_dropout,
                           lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
                           lora_train_embeddings=embeddings, resume=args.resume, train=train)
    try:
        result = finetune(opts)
    except (DataError, CheckpointError, FileNotFoundError, ValueError, ImportError) as e:
        print(f"qwen train: error: {e}", file=sys.stderr)
        return 2
    if result.interrupted:
        print(f"interrupted at step {result.steps}; continue with --resume", file=sys.stderr)
        return 130
    return 0
