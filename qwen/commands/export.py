"""``qwen export --format gguf``: write a checkpoint as a GGUF file that llama.cpp runs as its "qwen" architecture.

The file carries the weights (renamed to llama.cpp's tensor names), the hyper-parameters and the whole
tokenizer (the Qwen BPE vocabulary with its merges, the 208 special tokens, BOS/EOS/PAD ids and the
ChatML chat template), so `llama-cli -m FILE`, llama-server, llama-cpp-python or ollama need nothing else.

Types: f32, f16 (default), bf16, q8_0, q4_0 (written here with the gguf package) and q4_k_m (llama.cpp's
own quantizer via llama-cpp-python). GPTQ checkpoints (Qwen-*-Int4/-Int8, `qwen quantize` output) are
dequantized to float first and then stored in the requested type. docs/gguf.md has the details.
"""

from __future__ import annotations

import argparse
import sys

FORMATS = ("gguf",)


def main(argv: list[str] | None = None) -> int:
    from ..export_gguf import GGUF_TYPES

    parser = argparse.ArgumentParser(prog="qwen export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--format", required=True, choices=FORMATS, help="output format (gguf: llama.cpp)")
    parser.add_argument("--model", "-m", required=True, metavar="DIR",
                        help="checkpoint directory, float or GPTQ (or 'qwen-demo')")
    parser.add_argument("--output", "-o", required=True, metavar="FILE", help="file to write (written atomically)")
    parser.add_argument("--type", default="f16", choices=GGUF_TYPES,
                        help="tensor type of the matrices (default f16; norms and biases stay f32)")
    parser.add_argument("--name", default=None, help="general.name in the file (default: the directory name)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from ..checkpoint import CheckpointError
    from ..config import ConfigError
    from ..export_gguf import GGUFExportError, export_gguf
    from ..hub import ModelNotFoundError
    from ..quant.layout import QuantConfigError
    from ..tokenizer import VocabFileError

    try:
        result = export_gguf(args.model, args.output, type=args.type, progress=not args.no_progress, name=args.name)
    except (GGUFExportError, CheckpointError, ConfigError, QuantConfigError, VocabFileError, ModelNotFoundError,
            FileNotFoundError, OSError) as e:
        print(f"qwen export: {e}", file=sys.stderr)
        return 1
    types = ", ".join(f"{n} {k}" for k, n in sorted(result.tensor_types.items()))
    print(f"wrote {result.path}: {result.type}, {result.tensors} tensors ({types}), {result.size_bytes / 1e6:.1f} MB "
          f"from a {result.source} checkpoint in {result.seconds:.1f} s")
    return 0
