"""What the bench engines share (the model every engine gets, the timing loop), so that the engine modules
(core.py, qwencpp.py) import it from here instead of from each other."""

from __future__ import annotations

import argparse
from statistics import median
from typing import Any


def build_model(preset: str, seed: int, dtype_name: str, overrides: dict[str, Any]) -> Any:
    import torch

    from ..config import preset_config
    from ..model import QWenLMHeadModel

    config = preset_config(preset, **overrides)
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    model.to_empty(device="cpu")
    model.init_weights(seed=seed)
    return model.to(getattr(torch, dtype_name)).eval()


def weight_bytes_per_token(config: Any, esize: int) -> int:
    """Weight bytes one decode step reads: everything but the embedding table (a gather of one row),
    except that a tied head reads that table."""
    head_is_table = config.tie_word_embeddings
    return (config.num_parameters() - (0 if head_is_table else config.vocab_size * config.hidden_size)) * esize


def measure(run: Any, config: Any, esize: int, args: argparse.Namespace,
            weights: int | None = None) -> list[dict[str, Any]]:
    """Time ``run(ids [1, T], n) -> (seconds to first token, [inter-token seconds])`` per prompt length.

    ``weights``: bytes of weights one decode step reads (default: every weight but the embedding, at ``esize``).
    """
    import torch

    gen = torch.Generator().manual_seed(1)
    run(torch.randint(0, 1000, (1, 16), generator=gen), 4)  # warm-up
    weights = weight_bytes_per_token(config, esize) if weights is None else weights
    results = []
    for prompt_len in args.prompt_lens:
        ids = torch.randint(0, 1000, (1, prompt_len), generator=gen)
        timings = [run(ids, args.new_tokens) for _ in range(args.repeats)]
        ctx = prompt_len + args.new_tokens / 2  # mean context while decoding
        kv_bytes = 2 * config.num_hidden_layers * config.hidden_size * ctx * esize
        results.append({
            "prompt_len": prompt_len, "new_tokens": args.new_tokens,
            "prefill_tok_s": prompt_len / min(t for t, _ in timings),
            "decode_tok_s": 1 / median([d for _, gaps in timings for d in gaps]),
            "bytes_per_token": weights + kv_bytes,
        })
    return results
