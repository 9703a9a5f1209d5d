"""The quantization accuracy table: held-out perplexity of one model under every weight format, with the
KV cache in float and in int8 (the model cards' quantization table, on a model we can ship).

    python -m qwen.bench.quant_accuracy                       # the embedded demo model
    python -m qwen.bench.quant_accuracy --model DIR --json table.json
    python -m qwen.bench.quant_accuracy --outliers 50 3      # the same model with 3 norm channels scaled 50x

Rows: float32, RTN and GPTQ int8 / int4 (GPTQ with act-order; official AutoGPTQ layout, group size
``--group-size``), float32 and GPTQ int4 with ``int8_lm_head``, bitsandbytes NF4 and LLM.int8 (when
bitsandbytes is installed). Columns: the KV cache
in float, int8 ``round`` and int8 ``official`` (docs/quantization.md). The text is fed in chunks of
``--chunk`` tokens through the KV cache, so every chunk attends to cached (and, in the int8 columns,
quantized) keys and values of the chunks before it; with a float cache this equals a one-pass evaluation.

Data (demo model): calibration on 32 documents of the demo's pretraining text, evaluation on 24 other
documents (~6k tokens), as tests/test_quant_gptq.py.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from typing import Any

import torch

KV_MODES = ("float", "round", "official")


def demo_texts(tokenizer: Any, max_tokens: int = 256) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(calibration, evaluation) sequences: alternate documents of the demo model's pretraining text."""
    from ..finetune.demo.synthetic import SyntheticSet

    docs = SyntheticSet(1234).pretraining_documents(1)
    ids = [torch.tensor((tokenizer.encode(d) + [tokenizer.eod_id])[:max_tokens]) for d in docs]
    return ids[0::2][:32], ids[1::2][:24]


@torch.no_grad()
def perplexity(model: Any, texts: list[torch.Tensor], chunk: int | None = None) -> float:
    """exp(mean next-token NLL) over ``texts``; with ``chunk``, fed ``chunk`` tokens at a time through a KV cache."""
    from ..cache import KVCache

    nll, count = 0.0, 0
    for ids in texts:
        step = chunk or len(ids)
        cache = KVCache.for_model(model, 1, len(ids)) if chunk else None
        hidden = []
        for start in range(0, len(ids), step):
            out = model(ids[None, start : start + step], past_key_values=cache, use_cache=cache is not None,
                        output_hidden_states=True, logits_to_keep=1)
            hidden.append(out.hidden_states[-1][0])  # after ln_f
        h = torch.cat(hidden)[:-1]
        targets = ids[1:]
        # The 152k-word head 32 positions at a time: ~20 MB of logits instead of 150 MB.
        for i in range(0, len(targets), 32):
            logits = model.lm_head(h[i : i + 32]).float()
            nll += float(torch.nn.functional.cross_entropy(logits, targets[i : i + 32], reduction="sum"))
        count += len(targets)
    return math.exp(nll / count)


def _with_kv(model: Any, mode: str) -> Any:
    model.config.use_cache_quantization = mode != "float"
    if mode != "float":
        model.config.cache_quantization_mode = mode
    return model


def build_rows(base: Any, calibration: list[torch.Tensor], group_size: int) -> dict[str, Any]:
    """{label: model} for every weight format (quantized copies of ``base``)."""
    from ..quant import GPTQConfig, quantize_model

    rows: dict[str, Any] = {"float32": base}
    for label, method, bits in (("RTN int8", "rtn", 8), ("GPTQ int8", "gptq", 8), ("RTN int4", "rtn", 4),
                                ("GPTQ int4", "gptq", 4)):
        model = copy.deepcopy(base)
        quantize_model(model, GPTQConfig(bits=bits, group_size=group_size, desc_act=method == "gptq"), method,
                       calibration, progress=False)
        rows[label] = model
    from ..quant.head import quantize_lm_head

    for label in ("float32", "GPTQ int4"):
        model = copy.deepcopy(rows[label])
        if quantize_lm_head(model):  # needs the CPU kernels
            rows[f"{label} + int8 lm_head"] = model
    try:
        from ..quant.bnb import BnbSettings, quantize_with_bitsandbytes

        for label, settings in (("bnb NF4", BnbSettings(bits=4, quant_type="nf4")), ("bnb int8", BnbSettings(bits=8))):
            model = quantize_with_bitsandbytes(copy.deepcopy(base), settings)
            rows[label] = model.eval()
    except ImportError as exc:
        print(f"bitsandbytes rows skipped: {exc}", file=sys.stderr)
    return rows


def outlier_table(base: Any, calibration: list[torch.Tensor], evaluation: list[torch.Tensor], group_size: int,
                  factor: float, channels: int, kinds: tuple[str, ...] = ("norm",)) -> dict[str, dict[str, float]]:
    """Perplexity of ``base`` with outlier channels (qwen.quant.outliers), per weight format and kernel.

    Columns: ``prefill`` (each text in one forward: the prefill kernels), ``chunks`` (16 tokens at a
    time through the KV cache: the few-row kernels), each with the default kernels and with
    ``quant_kernel="dequant"`` (the same weights, exact matmuls), and fbgemm's opt-in per-tensor int8."""
    from ..quant.linear import prepare_quant_layers
    from ..quant.outliers import add_outlier_channels

    model = copy.deepcopy(base)
    add_outlier_channels(model, factor=factor, channels=channels, kinds=kinds)
    table: dict[str, dict[str, float]] = {"float32 (original)": {"prefill": perplexity(base, evaluation)},
                                          "float32 (outliers)": {"prefill": perplexity(model, evaluation)}}
    for label, (method, bits) in {"RTN int8": ("rtn", 8), "GPTQ int8": ("gptq", 8), "RTN int4": ("rtn", 4),
                                  "GPTQ int4": ("gptq", 4)}.items():
        from ..quant import GPTQConfig, quantize_model

        q = copy.deepcopy(model)
        quantize_model(q, GPTQConfig(bits=bits, group_size=group_size, desc_act=method == "gptq"), method,
                       calibration, progress=False)
        row: dict[str, float] = {}
        for kernel in ("auto", "dequant") + (("int8-fbgemm",) if bits == 8 else ()):
            prepare_quant_layers(q, torch.float32, kernel)
            row[f"prefill {kernel}"] = perplexity(q, evaluation)
            if kernel != "int8-fbgemm":
                row[f"chunks {kernel}"] = perplexity(q, evaluation, 16)
        table[label] = row
        print(f"  {label}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), file=sys.stderr, flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    from .. import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(prog="python -m qwen.bench.quant_accuracy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen-demo", help="checkpoint directory (default: the demo model)")
    p.add_argument("--group-size", type=int, default=-1,
                   help="GPTQ/RTN group size (default -1: the demo's 128- and 344-input layers share no larger divisor)")
    p.add_argument("--chunk", type=int, default=16, help="tokens per forward through the KV cache (default 16)")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--outliers", nargs=2, type=float, metavar=("FACTOR", "CHANNELS"), default=None,
                   help="instead: the outlier table (qwen.quant.outliers, norm channels scaled by FACTOR), default "
                   "kernels vs quant_kernel='dequant'")
    args = p.parse_args(argv)

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    base = AutoModelForCausalLM.from_pretrained(args.model, cpu_packed_weights=False, progress=False).eval()
    calibration, evaluation = demo_texts(tokenizer)
    tokens = sum(len(t) - 1 for t in evaluation)
    print(f"{args.model}: {len(calibration)} calibration and {len(evaluation)} evaluation documents "
          f"({tokens} evaluated tokens), chunks of {args.chunk}", file=sys.stderr)
    if args.outliers:
        factor, channels = args.outliers[0], int(args.outliers[1])
        table = outlier_table(base, calibration, evaluation, args.group_size, factor, channels)
        ref = table["float32 (original)"]["prefill"]
        print(f"\n{channels} channels x{factor:g}; perplexity (vs the original float model)\n")
        print("| weights | prefill, default kernels | prefill, dequant | chunks of 16, default | chunks of 16, dequant "
              "| prefill, int8-fbgemm |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, cols in table.items():
            cells = [f"{cols[c]:.4f} ({cols[c] / ref - 1:+.2%})" if c in cols else "" for c in
                     ("prefill auto", "prefill dequant", "chunks auto", "chunks dequant", "prefill int8-fbgemm")]
            if "prefill" in cols:
                cells[0] = f"{cols['prefill']:.4f} ({cols['prefill'] / ref - 1:+.2%})"
            print(f"| {label} | " + " | ".join(cells) + " |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"model": args.model, "group_size": args.group_size, "outliers": [factor, channels],
                           "evaluated_tokens": tokens, "perplexity": table}, f, indent=1)
        return 0
    table: dict[str, dict[str, float]] = {}
    for label, model in build_rows(base, calibration, args.group_size).items():
        table[label] = {}
        for mode in KV_MODES:
            table[label][mode] = perplexity(_with_kv(model, mode), evaluation, args.chunk)
            print(f"  {label:10s} KV {mode:8s} {table[label][mode]:.4f}", file=sys.stderr, flush=True)
        _with_kv(model, "float")
    ref = table["float32"]["float"]
    print("\n| weights | KV float | KV int8 round | KV int8 official |")
    print("|---|---:|---:|---:|")
    for label, cols in table.items():
        cells = [f"{cols[m]:.4f} ({cols[m] / ref - 1:+.2%})" for m in KV_MODES]
        print(f"| {label} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "group_size": args.group_size, "chunk": args.chunk,
                       "evaluated_tokens": tokens, "perplexity": table}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
