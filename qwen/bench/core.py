"""``qwen bench``: batch-1 decode and prefill speed and peak memory, ours vs transformers, in one run.

Each engine runs in its own worker process (so peak-RSS numbers do not mix) on identical random weights
(same seed, same init), with the same dtype and thread count. transformers runs its Qwen2ForCausalLM
with the Qwen-1 weights mapped onto it (c_attn split into q/k/v, w2 -> gate, w1 -> up), which is
exactly the Qwen-1 network when NTK/LogN are inactive (prompts here stay below seq_length).

Engines are timed through their public ``generate`` (greedy, no early stop) with a streamer that
timestamps each new token; per prompt length, over ``--repeats`` generations of N tokens:
  prefill tok/s = prompt_len / (best time to the first new token)
  decode tok/s  = 1 / (median interval between consecutive new tokens, over all repeats)
The median keeps transient load from other tenants of a shared VM out of the decode figure.
Decode is also stated as a share of the memory-read bandwidth measured in the same run: bytes of
weights read per token (everything but the embedding table, plus the KV cache) x tok/s / bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Any

from .common import build_model, measure, weight_bytes_per_token

WORKER_FLAG = "--worker"


# ---------------------------------------------------------------------------------------------- measurements
def measure_read_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict[str, float]:
    """Best-of-N read bandwidth (GB/s) of an fp32 matrix-vector product and of a sum over ``gib`` GiB."""
    import torch

    n = int((gib * (1 << 30) / 4) ** 0.5)
    mat = torch.randn(n, n)
    vec = torch.randn(n)
    nbytes = mat.numel() * 4

    def best(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return nbytes / min(times) / 1e9

    out = {"matvec_gbs": best(lambda: torch.mv(mat, vec)), "sum_gbs": best(lambda: mat.sum())}
    out["read_gbs"] = max(out.values())
    return out


class TimingStreamer:
    """HF streamer protocol (put(prompt), put(token)..., end()) that timestamps every generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _generate_fn(engine: str, model: Any) -> Any:
    """run(ids, n) -> (seconds to the first new token, [seconds between consecutive new tokens])."""
    import torch

    def timed(call: Any, n: int) -> tuple[float, list[float]]:
        streamer = TimingStreamer()
        t0 = time.perf_counter()
        call(streamer)
        times = streamer.times
        if len(times) != n:
            raise RuntimeError(f"{engine}: expected {n} streamed tokens, got {len(times)}")
        return times[0] - t0, [b - a for a, b in zip(times, times[1:])]

    if engine.startswith("ours"):
        from ..generate import generate

        def run(ids: torch.Tensor, n: int) -> tuple[float, list[float]]:
            return timed(lambda s: generate(model, ids, max_new_tokens=n, do_sample=False, eos_token_id=[],
                                            stop_words_ids=[], repetition_penalty=1.0, streamer=s), n)
    else:
        def run(ids: torch.Tensor, n: int) -> tuple[float, list[float]]:
            return timed(lambda s: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                                  min_new_tokens=n, do_sample=False, pad_token_id=0,
                                                  eos_token_id=None, streamer=s), n)
    return run


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    if args.engine == "bandwidth":
        return {"engine": "bandwidth", "bandwidth": measure_read_bandwidth()}
    if args.engine.startswith("qwen.cpp"):
        from .qwencpp import run_worker

        return run_worker(args)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = build_model(args.preset, args.seed, args.dtype, json.loads(args.overrides))
    if args.engine == "transformers":
        from ..interop import to_transformers_qwen2

        engine_model = to_transformers_qwen2(model)
    else:
        engine_model = model
    config, esize = model.config, torch.empty((), dtype=model.dtype).element_size()
    weights = weight_bytes_per_token(config, esize)
    kernels: dict[str, int] = {}
    if args.engine in QUANTIZED_ENGINES:
        kernels, weights = _quantize_for_bench(model, QUANTIZED_ENGINES[args.engine])
    if args.engine == "ours" or args.engine in QUANTIZED_ENGINES:
        # The default CPU inference path of from_pretrained (fp32 weights packed for oneDNN; in the
        # quantized engines only lm_head is left, kept in float as the official Int4/Int8 checkpoints do).
        from ..cpu_pack import pack_linear_layers, packing_supported

        if packing_supported(model.dtype):
            pack_linear_layers(model)
    with torch.inference_mode():
        results = measure(_generate_fn(args.engine, engine_model), config, esize, args, weights)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"engine": args.engine, "preset": args.preset, "dtype": args.dtype, "threads": args.threads,
            "kernels": kernels, "parameters": config.num_parameters(), "weight_bytes_per_token": weights,
            "peak_rss_bytes": peak, "rss_before_model": rss0, "results": results}


# ours-int8 / ours-int4: the transformer blocks round-to-nearest quantized into the official GPTQ layout
# (group 128, as the official -Int8/-Int4 checkpoints; the kernels do not care how codes were found),
# lm_head in float as in those checkpoints. The -head8 variants also round lm_head to int8
# (from_pretrained(..., int8_lm_head=True)), as qwen.cpp's q8_0/q4_0 files quantize every matrix.
QUANTIZED_ENGINES = {"ours-int8": (8, False), "ours-int4": (4, False), "ours-int8-head8": (8, True),
                     "ours-int4-head8": (4, True)}


def _quantize_for_bench(model: Any, spec: tuple[int, bool]) -> tuple[dict[str, int], int]:
    """Quantize ``model``'s blocks in place; returns ({kernel: layers}, weight bytes one decode step reads)."""
    import torch

    from ..quant.gptq import quantize_model_rtn
    from ..quant.layout import GPTQConfig
    from ..quant.linear import prepare_quant_layers, quant_linear_layers

    bits, int8_head = spec
    quantize_model_rtn(model, GPTQConfig(bits=bits, group_size=128), progress=False)
    counts = prepare_quant_layers(model, torch.float32)
    read = 0
    for _, layer in quant_linear_layers(model):
        gemv = layer._runtime.get("gemv")
        if gemv is not None:  # what the decode kernel streams: its codes, scales and scale*zero
            read += gemv.nbytes()
        else:
            read += sum(b.numel() * b.element_size() for b in layer.buffers())
        counts[f"decode:{layer.decode_kernel or layer.kernel}"] = counts.get(f"decode:{layer.decode_kernel or layer.kernel}", 0) + 1
    cfg = model.config
    if int8_head:
        from ..quant.head import quantize_lm_head

        if not quantize_lm_head(model):
            raise RuntimeError("int8 lm_head needs the CPU kernels (qwen.kernels.why_unavailable())")
        read += model.lm_head.rows.nbytes()
    else:
        read += cfg.vocab_size * cfg.hidden_size * 4  # the float lm_head
    return counts, read


# ---------------------------------------------------------------------------------------------- driver
def _spawn(engine: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qwen.bench.core", WORKER_FLAG, "--engine", engine, "--preset", args.preset,
           "--dtype", args.dtype, "--threads", str(args.threads), "--seed", str(args.seed),
           "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats), "--overrides", args.overrides,
           "--prompt-lens", *map(str, args.prompt_lens)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def render_markdown(runs: list[dict[str, Any]], bandwidth: dict[str, float]) -> str:
    ours = next(r for r in runs if r["engine"] == "ours")
    others = [r for r in runs if r["engine"] in ("ours-unpacked", "transformers", "qwen.cpp")]
    bw = bandwidth["read_gbs"]
    lines = [
        f"Preset `{ours['preset']}` ({ours['parameters'] / 1e6:,.0f} M parameters), {ours['dtype']}, "
        f"{ours['threads']} threads, batch 1, greedy. Measured read bandwidth: {bw:.1f} GB/s "
        f"(fp32 matvec {bandwidth['matvec_gbs']:.1f}, sum {bandwidth['sum_gbs']:.1f}). "
        f"Weights read per token: {ours['weight_bytes_per_token'] / 1e9:.2f} GB.",
        "",
        "| engine | prompt | prefill tok/s | decode tok/s | decode share of read bandwidth | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        for res in run["results"]:
            share = res["bytes_per_token"] * res["decode_tok_s"] / (bw * 1e9)
            lines.append(f"| {run['engine']} | {res['prompt_len']} | {res['prefill_tok_s']:,.1f} | "
                         f"{res['decode_tok_s']:.2f} | {share:.0%} | {run['peak_rss_bytes'] / 2**30:.2f} GiB |")
    by_name = {r["engine"]: r for r in runs}
    pairs = [("ours", other["engine"]) for other in others]
    pairs += [(a, b) for a in QUANTIZED_ENGINES for b in ("ours", "qwen.cpp-q8_0" if "int8" in a else "qwen.cpp-q4_0")
              if a in by_name and b in by_name]
    for a_name, b_name in pairs:
        lines += ["", f"Ratios {a_name} / {b_name}:", ""]
        for a, b in zip(by_name[a_name]["results"], by_name[b_name]["results"]):
            lines.append(f"- prompt {a['prompt_len']}: prefill {a['prefill_tok_s'] / b['prefill_tok_s']:.2f}x, "
                         f"decode {a['decode_tok_s'] / b['decode_tok_s']:.2f}x")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="`qwen bench serve --help`: the serving benchmark (the HTTP server under N "
                                       "concurrent streaming clients, ours vs one request at a time).")
    p.add_argument("--preset", default="qwen-300m", help="model shape (see qwen.config.PRESETS; default qwen-300m)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--new-tokens", type=int, default=32, help="tokens generated per decode measurement")
    p.add_argument("--repeats", type=int, default=3, help="best-of repeats per measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engines", default="ours,transformers",
                   help="comma-separated: ours (default CPU path: oneDNN-packed weights), ours-unpacked "
                        "(plain nn.Linear), ours-int8 / ours-int4 (blocks quantized to the official GPTQ layout, "
                        "group 128; -head8 variants also round lm_head to int8), transformers (needs the dev extra), qwen.cpp / qwen.cpp-q8_0 / qwen.cpp-q4_0 "
                        "(needs qwen-cpp; see qwen/bench/qwencpp.py)")
    p.add_argument("--overrides", default="{}", help='JSON config overrides, e.g. \'{"num_hidden_layers": 4}\'')
    p.add_argument("--json", metavar="FILE", help="also write raw results as JSON")
    p.add_argument("--engine", help=argparse.SUPPRESS)
    p.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        from .serve import main as serve_main

        return serve_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    cpp = [e for e in engines if e.startswith("qwen.cpp")]
    if cpp:
        from .qwencpp import ENGINE_KINDS, available

        unknown = [e for e in cpp if e not in ENGINE_KINDS]
        if unknown:
            raise SystemExit(f"unknown engine(s) {unknown}; qwen.cpp engines: {sorted(ENGINE_KINDS)}")
        if not available():
            print("qwen.cpp is not installed; skipping it (see qwen/bench/qwencpp.py for the install line)",
                  file=sys.stderr)
            engines = [e for e in engines if e not in cpp]
    if "ours" not in engines:
        engines.insert(0, "ours")
    print("measuring memory read bandwidth ...", file=sys.stderr, flush=True)
    bandwidth = _spawn("bandwidth", args)["bandwidth"]
    runs = []
    for engine in engines:
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        runs.append(_spawn(engine, args))
    table = render_markdown(runs, bandwidth)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}\n")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "runs": runs, "argv": argv}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
