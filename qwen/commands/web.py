"""``qwen web``: a chat page in the browser, built with Gradio (docs/web-demo.md).

    qwen web                                     # the embedded demo model on http://127.0.0.1:7860
    qwen web --model /models/Qwen-7B-Chat --port 8000 --inbrowser

Streaming answers, Stop, Regenerate, Clear, a system prompt and the generation settings; Markdown,
code and LaTeX are rendered. Answers come from the same continuous-batching engine as
``qwen serve``, so several browser tabs are served together. Gradio's analytics are off and the
page is never shared through a public link. Needs gradio (pip install gradio==6.31.0).
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen web", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--host", "--server-name", dest="host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; 0.0.0.0 exposes the page to the network)")
    p.add_argument("--port", "--server-port", dest="port", type=int, default=7860, help="default 7860")
    p.add_argument("--inbrowser", action="store_true", help="open the page in the default browser")
    p.add_argument("--title", default="Qwen", help="page title and heading (default 'Qwen')")
    p.add_argument("--system", default=None,
                   help="initial system prompt, editable on the page (default 'You are a helpful assistant.')")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="answers decoded together, and so answers in progress at once (default 16)")
    p.add_argument("--max-batched-tokens", type=int, default=4096,
                   help="prompt + decode tokens one engine step may process (default 4096)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="answers waiting for a batch row before the page reports 'busy' (default 256)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context window in tokens (default: the config's max_position_embeddings)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..serve.web import create_web_app, launch  # imports gradio (analytics switched off first)
    except ImportError as e:
        print(f"qwen web needs gradio: pip install gradio==6.31.0 ({e})", file=sys.stderr)
        return 1
    from ..chat_template import DEFAULT_SYSTEM  # here, not at the top: it imports torch, and --help should not
    from ..serve.engine import Engine
    from .common import load

    model, tokenizer = load(args)
    engine = Engine(model, tokenizer, max_batch_size=args.max_batch_size, max_batched_tokens=args.max_batched_tokens,
                    max_queue=args.max_queue, max_model_len=args.max_model_len).start()
    try:
        system = DEFAULT_SYSTEM if args.system is None else args.system
        app = create_web_app(engine, model, tokenizer, system=system, title=args.title)
        print(f"qwen web: {args.model} on http://{args.host}:{args.port} "
              f"(batch {args.max_batch_size}, context {engine.max_model_len}); Ctrl-C stops", file=sys.stderr)
        # Enough worker threads for every answer in progress plus the Stop/Clear clicks.
        launch(app, host=args.host, port=args.port, inbrowser=args.inbrowser,
               max_threads=max(40, args.max_batch_size + 8), quiet=True)
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
    return 0
