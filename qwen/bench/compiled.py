"""``python -m qwen.bench.compiled``: decode speed of the eager, fused-C and compiled (torch.compile) paths.

One process, one model, the engines one after the other on the same weights:
  eager     the module-by-module forward (``model.transformer.fused_decode = False``), plain nn.Linear
  fused     the CPU default: oneDNN-packed weights and the one-call C decode step (CPU, fp32, batch 1 only)
  compiled  generate(compile=True): static cache + inductor graphs (CUDA graphs on a GPU), plain nn.Linear
Each is timed through ``generate`` (greedy, no early stop). Decode tok/s = (N - 1) / (t(N new tokens) -
t(1 new token)), medians over ``--repeats`` runs, so prefill and the compiled loop's bursts of tokens cancel
out; with batch B the figure counts B tokens per step. ``compile_s`` is the first compiled call's extra time
(its graphs built in a fresh inductor cache, unless --warm-cache). With ``--kv int8`` the runs repeat with
the int8 KV cache. On CUDA the peak memory of each run is reported (torch.cuda.max_memory_allocated).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from statistics import median
from typing import Any

ENGINES = ("eager", "fused", "compiled")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_generate(model: Any, ids: Any, new_tokens: int, compile: bool, repeats: int) -> list[float]:
    from ..generate import generate

    times = []
    for _ in range(repeats):
        _sync(str(ids.device))
        t0 = time.perf_counter()
        generate(model, ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[], stop_words_ids=[],
                 repetition_penalty=1.0, compile=compile)
        _sync(str(ids.device))
        times.append(time.perf_counter() - t0)
    return times


def run_engine(model: Any, engine: str, prompt_len: int, new_tokens: int, batch: int, repeats: int) -> dict[str, Any]:
    """Time one engine on ``model`` (which it may reconfigure: fused_decode, packing)."""
    import torch

    device = str(model.device)
    if engine == "fused":
        if device != "cpu":
            raise ValueError("the fused C decode step is a CPU path")
        from ..cpu_pack import pack_linear_layers, packing_supported

        if packing_supported(model.dtype):
            pack_linear_layers(model)
    model.transformer.fused_decode = engine == "fused"
    compile = engine == "compiled"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, min(1000, model.config.vocab_size), (batch, prompt_len), generator=gen).to(model.device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    # Warm-up: the first call builds the compiled graphs (the later, shorter calls reuse its decoder).
    first = time_generate(model, ids, new_tokens, compile, 1)[0]
    short = median(time_generate(model, ids, 1, compile, repeats))
    long = median(time_generate(model, ids, new_tokens, compile, repeats))
    decode_s = long - short  # <= 0 only when the run is too short to time: raise --new-tokens
    out = {"engine": engine, "prompt_len": prompt_len, "new_tokens": new_tokens, "batch": batch,
           "prefill_s": short, "decode_tok_s": batch * (new_tokens - 1) / decode_s if decode_s > 0 else float("nan"),
           "compile_s": max(first - long, 0.0) if compile else 0.0}
    if device.startswith("cuda"):
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if compile:
        from .. import compiled

        out["compilations"] = [d.compilations for d in compiled.decoders(model)]
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    if args.warm_cache:
        return _run(args)
    with tempfile.TemporaryDirectory(prefix="inductor-") as fresh:  # a cold compile, then nothing left behind
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh
        return _run(args)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .common import build_model

    if args.model:
        from ..auto import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model, progress=False, cpu_packed_weights=False,
                                                     torch_dtype=getattr(torch, args.dtype))
        model = model.to(args.device).eval()
    else:
        model = build_model(args.preset, 0, args.dtype, json.loads(args.overrides)).to(args.device)
    results = []

    def one(engine: str, kv: str) -> None:
        model.config.use_cache_quantization = kv == "int8"
        print(f"{engine} (KV {kv}) ...", file=sys.stderr, flush=True)
        r = run_engine(model, engine, args.prompt_len, args.new_tokens, args.batch, args.repeats)
        r["kv"] = kv
        results.append(r)
        print(json.dumps(r), file=sys.stderr, flush=True)

    for kv in args.kv:
        for engine in args.engines:
            if engine != "fused":
                one(engine, kv)
    # The C step serves batch-1 fp32 float-cache CPU decode only; it packs the weights for oneDNN, which the
    # compiled path cannot trace, so it runs last.
    if "fused" in args.engines and args.device == "cpu" and args.batch == 1 and "float" in args.kv:
        one("fused", "float")
    return {"model": args.model or args.preset, "dtype": args.dtype, "device": args.device,
            "threads": args.threads, "load": os.getloadavg(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None, "results": results}


def render(report: dict[str, Any]) -> str:
    cuda = report["device"].startswith("cuda")
    head = "| engine | KV | batch | prompt | new | decode tok/s | prefill+1 s | compile s |"
    head += " peak GiB |" if cuda else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in report["results"]:
        row = (f"| {r['engine']} | {r['kv']} | {r['batch']} | {r['prompt_len']} | {r['new_tokens']} | "
               f"{r['decode_tok_s']:.1f} | {r['prefill_s']:.3f} | {r['compile_s']:.1f} |")
        lines.append(row + (f" {r['peak_gib']:.2f} |" if cuda else ""))
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwen.bench.compiled", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a model directory or name (e.g. qwen-demo); default: random weights of --preset")
    p.add_argument("--preset", default="qwen-300m")
    p.add_argument("--overrides", default="{}", help="JSON config overrides for --preset")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    p.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], default=list(ENGINES))
    p.add_argument("--kv", type=lambda s: [e for e in s.split(",") if e], default=["float"],
                   help="comma-separated: float, int8")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=33)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache (compile_s then "
                                                             "measures a cache hit)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        raise SystemExit(f"unknown engine(s) {unknown}; choose from {ENGINES}")
    report = run(args)
    print(f"{report['model']} {report['dtype']} on {report['gpu'] or report['machine']}, {report['threads']} "
          f"thread(s), torch {report['torch']}, load average {report['load'][0]:.1f}\n")
    print(render(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
