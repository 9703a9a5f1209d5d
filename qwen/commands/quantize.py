"""``qwen quantize``: GPTQ or round-to-nearest int4/int8 weights in the official AutoGPTQ layout.

The output directory is a checkpoint like the official Qwen-*-Chat-Int4/-Int8 ones: config.json
with a ``quantization_config`` (quant_method "gptq"), quantize_config.json, and per quantized
linear (attn.c_attn, attn.c_proj, mlp.w1, mlp.w2, mlp.c_proj of every block) the tensors qweight,
qzeros, scales, g_idx and bias; the embeddings, norms and lm_head are stored in float16. It loads
here (``AutoModelForCausalLM.from_pretrained``), in the official transformers + auto-gptq stack,
and, through the Qwen2-layout copy of ``qwen.bench.vllm_parity``, in current vLLM (docs/scale-out.md).

GPTQ calibrates on --calib FILE (the official fine-tuning JSON format as run_gptq.py, JSONL, or
plain text) or, without it, on the bilingual set that ships with the package (300 samples of prose,
chats, code, math and tables, ~100k tokens; qwen/assets/NOTICE). The result is deterministic for a
given model, data and machine. The model
is loaded in its checkpoint dtype and each block is quantized in float32, so a 7B model needs
about 16 GB of RAM plus the calibration activations (samples x tokens x hidden x 8 bytes).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..quant.layout import GPTQConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen quantize", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", "-m", required=True, metavar="DIR",
                        help="float checkpoint directory to quantize (or 'qwen-demo')")
    parser.add_argument("--output", "-o", required=True, metavar="DIR",
                        help="directory to write the quantized checkpoint to (written atomically)")
    parser.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
                        help="gptq (default) or rtn: round-to-nearest, no calibration")
    parser.add_argument("--bits", type=int, choices=[2, 4, 8], default=4, help="bits per weight (default 4)")
    parser.add_argument("--group-size", type=int, default=128,
                        help="inputs per scale/zero group; -1 = one group per output row (default 128, "
                        "as the official checkpoints). Must divide every quantized layer's input size")
    parser.add_argument("--desc-act", action="store_true",
                        help="GPTQ act-order: quantize columns by decreasing Hessian diagonal (g_idx records "
                        "each input's group); usually more accurate, and still fast on CPU here")
    parser.add_argument("--static-groups", action="store_true",
                        help="with --desc-act: fix group parameters before quantizing, in the original column "
                        "order (g_idx stays k // group_size)")
    parser.add_argument("--asym", action="store_true", help="asymmetric grid (sym=false); default symmetric")
    parser.add_argument("--damp-percent", type=float, default=0.01,
                        help="GPTQ dampening: this fraction of the mean Hessian diagonal is added to it (default 0.01)")
    parser.add_argument("--calib", metavar="FILE", default=None,
                        help="calibration data for GPTQ: official SFT JSON ([{'conversations': ...}]), JSONL, or "
                        "text (default: the built-in bilingual set)")
    parser.add_argument("--max-len", type=int, default=2048,
                        help="tokens per calibration sequence; longer samples are truncated (default 2048)")
    parser.add_argument("--num-samples", type=int, default=None,
                        help="calibration sequences to use, in file order (default: 128 from --calib, all 300 of "
                        "the built-in set)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="dtype to load the float model in (default: the checkpoint's); blocks are always "
                        "quantized in float32")
    parser.add_argument("--device", default=None,
                        help="where GPTQ runs each block (cpu, cuda, cuda:1; default: cpu, or cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..data import DataError
    from ..hub import ModelNotFoundError
    from ..quant.layout import GPTQConfig, QuantConfigError

    try:
        # model_file_base_name "model" as Qwen-7B-Chat-Int4: AutoGPTQ's own loader then finds model*.safetensors.
        config = GPTQConfig(bits=args.bits, group_size=args.group_size, damp_percent=args.damp_percent,
                            desc_act=args.desc_act, static_groups=args.static_groups, sym=not args.asym,
                            model_file_base_name="model")
        if args.method == "rtn" and (args.desc_act or args.static_groups):
            raise QuantConfigError("--desc-act and --static-groups are GPTQ options; drop them for --method rtn")
        if args.method == "rtn" and args.calib:
            raise QuantConfigError("--calib is a GPTQ option: round-to-nearest uses no calibration data")
        _run(args, config)
    except (CheckpointError, ConfigError, DataError, ModelNotFoundError, QuantConfigError, FileNotFoundError,
            OSError) as e:
        print(f"qwen quantize: {e}", file=sys.stderr)
        return 1
    return 0


def _run(args: argparse.Namespace, config: GPTQConfig) -> None:
    import torch

    from ..auto import AutoModelForCausalLM, AutoTokenizer
    from ..checkpoint import CheckpointError
    from ..quant import quantize_model
    from ..quant.calibration import load_calibration
    from ..quant.gptq import check_quantizable

    progress = not args.no_progress
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=args.dtype, cpu_packed_weights=False,
                                                 progress=progress)
    if model.config.quantization_config:
        raise CheckpointError(f"{args.model} is already quantized")
    check_quantizable(model, config)  # fail on shapes before reading calibration data
    calibration = None
    if args.method == "gptq":
        num_samples = args.num_samples if args.num_samples is not None else (128 if args.calib else None)
        calibration = load_calibration(args.calib, tokenizer, max_len=args.max_len, num_samples=num_samples)
        tokens = sum(len(c) for c in calibration)
        top = max(int(c.max()) for c in calibration)
        if top >= model.config.vocab_size:
            raise CheckpointError(f"calibration token id {top} is outside the model's vocab_size "
                                  f"{model.config.vocab_size}: the tokenizer in {args.model} does not match the model")
        source = args.calib or "the built-in calibration set"
        print(f"calibration: {len(calibration)} sequences, {tokens:,} tokens from {source}", file=sys.stderr)
    start = time.perf_counter()
    quantize_model(model, config, args.method, calibration, progress=progress, device=device)
    print(f"quantized {args.method} int{config.bits} (group size {config.group_size}) in "
          f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
    model.save_pretrained(args.output, tokenizer=tokenizer)
    print(f"wrote {args.output}")
