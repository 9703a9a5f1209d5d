"""``qwen serve``: the OpenAI-compatible API server with continuous batching (docs/serving.md).

    qwen serve                                   # the embedded demo model on 127.0.0.1:8000
    qwen serve --model /models/Qwen-7B-Chat --api-key sk-local --max-batch-size 32

Clients: the official ``openai`` package (``base_url="http://127.0.0.1:8000/v1"``), LangChain's
``ChatOpenAI``, curl. Needs the ``serve`` extra (fastapi, uvicorn).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import add_model_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", "--server-name", dest="host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the server)")
    p.add_argument("--port", "--server-port", dest="port", type=int, default=8000, help="default 8000")
    p.add_argument("--api-key", default=os.environ.get("QWEN_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $QWEN_API_KEY; unset = no auth)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and see (default: the checkpoint directory's name)")
    p.add_argument("--alias", action="append", default=[],
                   help="another accepted model id, e.g. gpt-3.5-turbo for clients that hard-code one (repeatable)")
    p.add_argument("--max-batch-size", type=int, default=16, help="sequences decoded together (default 16)")
    p.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="prompt + decode tokens one engine step may process (default 4096)")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="TOKENS",
                   help="prompt tokens prefilled per step while other requests are decoding (default: automatic, "
                   "about one decode step's worth, so arrivals do not stall running streams)")
    p.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429 (default 256)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the config's max_position_embeddings)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def model_name(path: str) -> str:
    return path if path == "qwen-demo" else Path(path).resolve().name or path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvicorn
    except ImportError:
        print("qwen serve needs fastapi and uvicorn: pip install 'qwen[serve]'", file=sys.stderr)
        return 1
    from ..serve.app import create_app
    from ..serve.engine import Engine
    from .common import load

    model, tokenizer = load(args)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_batched_tokens=args.max_batched_tokens,
                    max_queue=args.max_queue, max_model_len=args.max_model_len,
                    prefill_chunk=args.prefill_chunk).start()
    app = create_app(engine, tokenizer, model_id=args.served_model_name or model_name(args.model),
                     aliases=args.alias, api_key=args.api_key, generation_config=getattr(model, "generation_config", None))
    print(f"qwen serve: {args.model} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch_size}, context {engine.max_model_len})", file=sys.stderr)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        engine.stop()
    return 0
