"""``qwen info DIR``: config, parameter count, dtypes and size on disk of a checkpoint (weights are not loaded)."""

from __future__ import annotations

import argparse


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} P{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen info", description=__doc__)
    parser.add_argument("model", help="checkpoint directory (or qwen-demo)")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    args = parser.parse_args(argv)

    import json

    from ..checkpoint import describe_checkpoint

    info = describe_checkpoint(args.model)
    cfg = info["config"]
    if args.json:
        out = {k: v for k, v in info.items() if k != "config"}
        out["config"] = cfg.to_dict()
        print(json.dumps(out, indent=2, ensure_ascii=False))
        return 0
    print(f"path            {info['path']}")
    print(f"weights         {info['files']} {info['format']} file(s), {_human(info['size_on_disk'])} on disk")
    print(f"parameters      {info['parameters']:,} ({_human(info['parameters'], '')})")
    print("dtypes          " + ", ".join(f"{k}: {v:,}" for k, v in info["dtypes"].items()))
    print(f"architecture    hidden {cfg.hidden_size}, layers {cfg.num_hidden_layers}, heads {cfg.num_attention_heads}"
          f" x {cfg.head_dim}, mlp {cfg.ffn_hidden_size}, vocab {cfg.vocab_size}")
    print(f"context         seq_length {cfg.seq_length}, rope base {cfg.rotary_emb_base:g}, "
          f"dynamic NTK {cfg.use_dynamic_ntk}, LogN {cfg.use_logn_attn}")
    if cfg.quantization_config:
        print(f"quantization    {cfg.quantization_config}")
    return 0
