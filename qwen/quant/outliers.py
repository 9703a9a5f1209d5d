"""Function-preserving transforms that give a small model the activation outliers of real 7B/14B ones.

From ~6.7B parameters on, LLMs carry a few input channels whose activations are 20-100x larger than
the rest (LLM.int8(), SmoothQuant). Trained tiny models have none, so a quantized kernel that spends
its activation grid on the largest value (per-tensor 8-bit activations) looks fine on them and
fails on a real checkpoint. These transforms move the scale between a layer's input and its weight
so that the float model computes the same function (up to float rounding) while the chosen channels
of the quantized layers' inputs become ``factor`` times larger:

``norm``  ln_1 / ln_2 channel c times f, the next layers' input column c (attn.c_attn; mlp.w1 and
          mlp.w2) divided by f: the inputs of c_attn, w1 and w2 get outlier channels.
``value`` value row c of attn.c_attn (and its bias) times f, input column c of attn.c_proj divided
          by f: attention outputs are linear in V, so attn.c_proj's input gets them.
``mlp``   output row c of mlp.w1 times f (w1(x) enters the product w1(x) * silu(w2(x)) linearly),
          input column c of mlp.c_proj divided by f: mlp.c_proj's input gets them.
``head``  ln_f channel c times f, lm_head input column c divided by f (a tied head is untied first).

    python -m qwen.quant.outliers --model qwen-demo --output /tmp/demo-outliers --factor 50 --channels 3

The output is a float checkpoint in the official layout; quantize it with ``qwen quantize``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence

import torch
from torch import nn

KINDS = ("norm", "value", "mlp", "head")


def _pick(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    if not 0 < count <= n:
        raise ValueError(f"cannot pick {count} outlier channels out of {n}")
    return torch.randperm(n, generator=gen)[:count]


def _weight(module: nn.Module, what: str) -> torch.Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.device.type == "meta":
        raise TypeError(f"{what} has no plain float weight to rescale (transform the float model, before "
                        "quantizing, loaded with cpu_packed_weights=False)")
    return weight.data


def _scale_outputs(module: nn.Module, rows: torch.Tensor, factor: float, what: str) -> None:
    """Output channels ``rows`` of a norm or linear (its bias too) times ``factor``."""
    _weight(module, what)[rows] *= factor
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias.data[rows] *= factor


@torch.no_grad()
def add_outlier_channels(model: nn.Module, factor: float = 50.0, channels: int = 3,
                         kinds: Sequence[str] = ("norm",), layers: Iterable[int] | None = None,
                         same_channels: bool = True, seed: int = 0) -> dict[str, list[int]]:
    """Rescale ``model`` (a QWenLMHeadModel with float nn.Linear layers) in place; returns {where: channels}.

    ``same_channels`` uses one set of hidden channels for every block (real models' outliers sit in
    the residual stream, the same channels layer after layer); otherwise each block draws its own.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown outlier kinds {sorted(unknown)}; choose from {KINDS}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    blocks = model.transformer.h
    chosen = list(range(len(blocks))) if layers is None else sorted(set(layers))
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(f"layer {i} does not exist (the model has {len(blocks)})")
    hidden_channels = _pick(cfg.hidden_size, channels, gen)
    report: dict[str, list[int]] = {}
    for i in chosen:
        block = blocks[i]
        attn, mlp = block.attn, block.mlp
        if "norm" in kinds:
            c = hidden_channels if same_channels else _pick(cfg.hidden_size, channels, gen)
            _scale_outputs(block.ln_1, c, factor, f"h.{i}.ln_1")
            _weight(attn.c_attn, f"h.{i}.attn.c_attn")[:, c] /= factor
            _scale_outputs(block.ln_2, c, factor, f"h.{i}.ln_2")
            _weight(mlp.w1, f"h.{i}.mlp.w1")[:, c] /= factor
            _weight(mlp.w2, f"h.{i}.mlp.w2")[:, c] /= factor
            report[f"h.{i}.norm"] = c.tolist()
        if "value" in kinds:
            proj = cfg.num_attention_heads * cfg.head_dim  # the value slice of c_attn
            c = _pick(proj, channels, gen)
            _scale_outputs(attn.c_attn, 2 * proj + c, factor, f"h.{i}.attn.c_attn")
            _weight(attn.c_proj, f"h.{i}.attn.c_proj")[:, c] /= factor
            report[f"h.{i}.value"] = c.tolist()
        if "mlp" in kinds:
            c = _pick(cfg.ffn_hidden_size, channels, gen)
            _scale_outputs(mlp.w1, c, factor, f"h.{i}.mlp.w1")
            _weight(mlp.c_proj, f"h.{i}.mlp.c_proj")[:, c] /= factor
            report[f"h.{i}.mlp"] = c.tolist()
    if "head" in kinds:
        if model.lm_head.weight is model.transformer.wte.weight:
            # Tied (the demo model): give the head its own copy first, which changes nothing computed.
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            report["untied"] = []
        c = hidden_channels if same_channels else _pick(cfg.hidden_size, channels, gen)
        _scale_outputs(model.transformer.ln_f, c, factor, "ln_f")
        _weight(model.lm_head, "lm_head")[:, c] /= factor
        report["head"] = c.tolist()
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.quant.outliers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="float checkpoint directory (or 'qwen-demo')")
    parser.add_argument("--output", required=True, help="where to write the transformed checkpoint")
    parser.add_argument("--factor", type=float, default=50.0, help="outlier scale (default 50)")
    parser.add_argument("--channels", type=int, default=3, help="outlier channels per place (default 3)")
    parser.add_argument("--kinds", nargs="+", default=["norm"], choices=KINDS, help="where (default: norm)")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="blocks to transform (default: all)")
    parser.add_argument("--per-layer-channels", action="store_true",
                        help="draw channels per block instead of one set for all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from ..checkpoint import load_model
    from ..tokenizer import QWenTokenizer

    tokenizer = QWenTokenizer.from_pretrained(args.model)
    model = load_model(args.model, cpu_packed_weights=False, fp32=True, progress=False)
    try:
        report = add_outlier_channels(model, args.factor, args.channels, args.kinds, args.layers,
                                      not args.per_layer_channels, args.seed)
    except (TypeError, ValueError) as e:
        print(f"python -m qwen.quant.outliers: {e}", file=sys.stderr)
        return 1
    model.save_pretrained(args.output, tokenizer=tokenizer)
    places = ", ".join(f"{k}: {v}" for k, v in list(report.items())[:4])
    print(f"wrote {args.output} ({len(report)} places x{args.factor:g}; {places}{', ...' if len(report) > 4 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
