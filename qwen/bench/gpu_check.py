"""``python -m qwen.bench.gpu_check --out DIR``: the GPU checks of the compiled path, in one call.

Meant for a machine with one CUDA GPU that is lent for minutes (run from the repository root with
``PYTHONPATH=.``): every step writes its results into DIR as soon as it ends, so a run stopped at a
time limit still leaves what it finished.

1. ``pytest -m gpu tests/test_compiled.py``: inductor + CUDA graphs against the eager model (fp32 and
   bf16, dynamic NTK + LogN, KV int8, window attention), one graph per kind, no CUDA-graph skips, the
   300M shape's decode speed-up, threads sharing one model. Log: gpu-tests.log.
2. The model-card setting (Qwen-7B-shaped random weights in bf16, batch 1, a 1-token context and
   ``--new-tokens`` generated; the official table generates 2048 on an A100): decode tok/s, compile time
   and peak memory for the eager and the compiled path, KV cache float and int8
   (qwen.bench.compiled). Files: model-card-7b.json, summary.md.
3. With ``--encode``: the same for a 2048-token prompt (prefill time and peak memory; the model card's
   "encoding 2048 tokens" row).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _append(out: Path, text: str) -> None:
    with open(out / "summary.md", "a", encoding="utf-8") as f:
        f.write(text + "\n")
    print(text, flush=True)


def _bench(out: Path, name: str, args: list[str], timeout: float, device: str = "cuda") -> None:
    from .compiled import render

    path = out / f"{name}.json"
    cmd = [sys.executable, "-m", "qwen.bench.compiled", "--device", device, "--json", str(path), *args]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        log = proc.stdout + proc.stderr
        ok = proc.returncode == 0
    except subprocess.TimeoutExpired as e:
        log, ok = f"timed out after {timeout:.0f} s\n{e.stdout or ''}{e.stderr or ''}", False
    (out / f"{name}.log").write_text(log if isinstance(log, str) else str(log), encoding="utf-8")
    took = time.perf_counter() - t0
    if ok and path.exists():
        report = json.loads(path.read_text(encoding="utf-8"))
        where = report["gpu"] or report["machine"]
        _append(out, f"\n### {name} ({took:.0f} s): {report['model']} {report['dtype']} on {where}, "
                     f"torch {report['torch']}\n\n`{' '.join(cmd[1:])}`\n\n{render(report)}")
    else:
        _append(out, f"\n### {name}: FAILED after {took:.0f} s (see {name}.log)\n\n```\n{log[-3000:]}\n```")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen.bench.gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-check"), help="where results go (default: $OUT)")
    p.add_argument("--new-tokens", type=int, default=512, help="tokens generated in the model-card setting")
    p.add_argument("--preset", default="qwen-7b")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--encode", action="store_true", help="also the 2048-token prompt row")
    # The defaults keep one call under ~9.5 minutes (a lent machine's 10-minute limit per command).
    p.add_argument("--tests-timeout", type=float, default=240)
    p.add_argument("--bench-timeout", type=float, default=300)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check here", file=sys.stderr)
        return 2
    _append(out, f"# GPU check: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    if not args.skip_tests:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-m", "gpu", "-rA", "-s",
               "tests/test_compiled.py"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.tests_timeout)
            log, rc = proc.stdout + proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            log, rc = f"timed out\n{e.stdout or ''}", -1
        (out / "gpu-tests.log").write_text(str(log), encoding="utf-8")
        tail = "\n".join(line for line in str(log).splitlines() if "PASSED" in line or "FAILED" in line
                         or "SKIPPED" in line or "tok/s" in line or " passed" in line or " failed" in line)
        _append(out, f"\n### GPU tests (exit {rc}, {time.perf_counter() - t0:.0f} s)\n\n```\n{tail[-4000:]}\n```")
    common = ["--preset", args.preset, "--dtype", "bfloat16", "--engines", "eager,compiled", "--kv", "float,int8",
              "--repeats", "1", "--threads", "8"]
    _bench(out, "model-card-7b", common + ["--prompt-len", "1", "--new-tokens", str(args.new_tokens)],
           args.bench_timeout)
    if args.encode:
        _bench(out, "encode-2048", common + ["--prompt-len", "2048", "--new-tokens", "2"], args.bench_timeout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
