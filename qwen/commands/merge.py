"""``qwen merge``: fold a LoRA adapter into its base model and save the result in the official layout.

The output is an ordinary checkpoint (config.json, safetensors, generation_config.json and the
tokenizer files), loadable without peft. The base model is the one named in the adapter's
adapter_config.json unless --base is given. The merge runs in fp32 (about 4 bytes per parameter of
memory on --device); the result is stored in --dtype, by default the base checkpoint's dtype.

Q-LoRA adapters trained on a GPTQ (Int4/Int8) checkpoint merge into the full-precision model it was
quantized from, as the official README does: pass it with --base (quantized weights cannot absorb
the adapter). Adapters trained with --quantize nf4 already name their full-precision base.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen merge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", metavar="ADAPTER_DIR", help="LoRA adapter directory (adapter_config.json + "
                        "adapter_model.safetensors), e.g. the output of `qwen train --method lora`")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="directory to write the merged checkpoint to (created; a new directory appears "
                        "complete or not at all)")
    parser.add_argument("--base", default=None, metavar="BASE_DIR",
                        help="base checkpoint directory (default: base_model_name_or_path from adapter_config.json); "
                        "for a Q-LoRA adapter over GPTQ, the full-precision model the quantized one was made from")
    parser.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                        help="storage dtype of the merged weights (default: the base checkpoint's dtype)")
    parser.add_argument("--device", default="cpu", help="where to run the merge: cpu (default) or cuda[:N]")
    args = parser.parse_args(argv)

    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..finetune.lora import check_merge_base, merge_adapter, resolve_base_model_path

    try:
        base = resolve_base_model_path(args.adapter, args.base)
        check_merge_base(base, explicit=args.base is not None)
        print(f"merging adapter {args.adapter} into base {base} -> {args.output}", file=sys.stderr)
        out = merge_adapter(args.adapter, args.output, dtype=args.dtype, base_model_path=base, device=args.device)
    except (CheckpointError, ConfigError, ImportError, OSError, ValueError) as e:
        print(f"qwen merge: {e}", file=sys.stderr)
        return 1
    print(f"wrote merged checkpoint to {out}")
    return 0
