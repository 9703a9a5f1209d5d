"""Batch-1 decode speed of float32 vs GPTQ int8/int4 layers on the CPU, on a random model.

    python -m qwen.bench.quant_kernels --preset qwen-1.8b            # all variants, one subprocess each
    python -m qwen.bench.quant_kernels --preset qwen-300m --variants fp32 int4-g128

Each variant runs in its own process (clean peak RSS): build the preset with random weights
(seed 0), round-to-nearest quantize the block linears (the kernels do not care how the codes were
found), then time greedy generation through ``qwen.generate.generate``: decode tok/s is 1 / the
median interval between consecutive new tokens. fp32 is the default CPU path of from_pretrained
(oneDNN-packed weights); quantized variants keep wte/lm_head/norms in fp32 as the loader does.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from statistics import median
from typing import Any

# name: (bits, group_size, forced kernel or "auto")
VARIANTS: dict[str, tuple[int, int, str]] = {
    "fp32": (0, 0, ""),
    "int8-g-1": (8, -1, "auto"),
    "int8-g128": (8, 128, "auto"),
    "int8-g128-rowwise": (8, 128, "int8-rowwise"),
    "int4-g128": (4, 128, "auto"),
    "int4-g128-dequant": (4, 128, "dequant"),
    "int4-g128-desc_act": (4, 128, "auto"),
}


def _worker(variant: str, preset: str, prompt_len: int, new_tokens: int, repeats: int,
            group_override: int | None = None) -> dict[str, Any]:
    import torch

    from ..config import preset_config
    from ..cpu_pack import pack_linear_layers
    from ..generate import generate
    from ..model import QWenLMHeadModel
    from ..quant.gptq import quantize_model_rtn
    from ..quant.layout import GPTQConfig
    from ..quant.linear import prepare_quant_layers, quant_linear_layers

    bits, group_size, kernel = VARIANTS[variant]
    if group_override is not None and group_size > 0:
        group_size = group_override
    config = preset_config(preset)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=0)
    model.eval().requires_grad_(False)
    kernels: dict[str, int] = {}
    if bits:
        quantize_model_rtn(model, GPTQConfig(bits=bits, group_size=group_size), progress=False)
        if variant.endswith("desc_act"):
            _permute_groups(model)
        kernels = prepare_quant_layers(model, torch.float32, kernel)
        weight_bytes = sum(b.numel() * b.element_size() for _, q in quant_linear_layers(model)
                           for b in q.buffers())
    else:
        weight_bytes = 0
    pack_linear_layers(model)  # the remaining fp32 linears (lm_head), as from_pretrained does

    class Stamps:
        def __init__(self) -> None:
            self.times: list[float] = []
            self.first = True

        def put(self, _value: Any) -> None:
            if self.first:
                self.first = False
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1000, (1, prompt_len), generator=gen)
    gaps: list[float] = []
    firsts: list[float] = []
    with torch.inference_mode():
        generate(model, ids, max_new_tokens=4, do_sample=False, eos_token_id=[], stop_words_ids=[])  # warm-up
        for _ in range(repeats):
            s = Stamps()
            t0 = time.perf_counter()
            generate(model, ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], stop_words_ids=[],
                     repetition_penalty=1.0, streamer=s)
            firsts.append(s.times[0] - t0)
            gaps += [b - a for a, b in zip(s.times, s.times[1:])]
    return {"variant": variant, "preset": preset, "threads": torch.get_num_threads(), "kernels": kernels,
            "decode_tok_s": 1 / median(gaps), "prefill_tok_s": prompt_len / min(firsts),
            "quantized_weight_bytes": weight_bytes,
            "rss_bytes": _current_rss(), "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _current_rss() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _permute_groups(model: Any) -> None:
    """Give every layer an act-order style g_idx (a permutation) with the same codes, to time that path."""
    import torch

    from ..quant.layout import pack_rows, unpack_rows
    from ..quant.linear import quant_linear_layers

    gen = torch.Generator().manual_seed(0)
    for _, layer in quant_linear_layers(model):
        perm = torch.randperm(layer.in_features, generator=gen)
        q = unpack_rows(layer.qweight, layer.bits)
        layer.qweight.copy_(pack_rows(q[perm], layer.bits))
        layer.g_idx.copy_(layer.g_idx[perm])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen.bench.quant_kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen-1.8b", help="model shape (qwen/config.py presets)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="what to time (default: all)")
    parser.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per repeat (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="generations per variant (default 3)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="replace the variants' group size 128 (e.g. 32 for the tiny preset)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.preset, args.prompt_len, args.new_tokens, args.repeats,
                                 args.group_size)))
        return 0
    rows = []
    for variant in args.variants:
        cmd = [sys.executable, "-m", "qwen.bench.quant_kernels", "--worker", variant, "--preset", args.preset,
               "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
               "--repeats", str(args.repeats)] + (["--group-size", str(args.group_size)] if args.group_size else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if proc.returncode:
            print(f"{variant}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{variant:20s} decode {row['decode_tok_s']:7.2f} tok/s  prefill {row['prefill_tok_s']:7.1f} tok/s  "
              f"RSS {row['rss_bytes'] / 2**30:5.2f} GiB  "
              f"quantized layers {row['quantized_weight_bytes'] / 2**20:8.1f} MiB  kernels {row['kernels']}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
