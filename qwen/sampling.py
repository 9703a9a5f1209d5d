"""Logits transforms and token sampling, as pure functions on [..., vocab] tensors.

Semantics follow transformers' processors and warpers (the reference the official Qwen code ran on):
penalties first (repetition, then OpenAI presence/frequency), then the warpers temperature -> top-k
-> top-p -> min-p, then greedy argmax or a multinomial draw. Removed tokens get -inf.
Nothing here knows about models, caches or tokenizers; generate.py composes these per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """One set of sampling settings for a whole batch (HF names; 0 / 1.0 / None switch a transform off)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(f"top_p must be in [0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        # temperature 0 means greedy (OpenAI convention); HF would reject it when sampling.
        return not self.do_sample or self.temperature == 0

    @property
    def needs_seen(self) -> bool:
        return self.repetition_penalty != 1.0

    @property
    def needs_output_counts(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def token_counts(token_ids: torch.Tensor, vocab_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """How often each vocabulary id occurs per row: ids [B, L] (mask [B, L], 0 = ignore) -> [B, V] int32."""
    counts = torch.zeros(token_ids.shape[0], vocab_size, dtype=torch.int32, device=token_ids.device)
    ones = torch.ones_like(token_ids, dtype=torch.int32) if mask is None else mask.to(torch.int32)
    return counts.scatter_add_(1, token_ids.long(), ones)


def apply_repetition_penalty(logits: torch.Tensor, counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF/CTRL repetition penalty on every id seen in the context: logit < 0 -> x*p, else x/p."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(counts > 0, penalized, logits)


def apply_presence_frequency_penalty(
    logits: torch.Tensor, counts: torch.Tensor, presence: float = 0.0, frequency: float = 0.0
) -> torch.Tensor:
    """OpenAI penalties: logit - presence * [count > 0] - frequency * count (counts of generated ids)."""
    if presence == 0.0 and frequency == 0.0:
        return logits
    c = counts.to(logits.dtype)
    return logits - presence * (c > 0).to(logits.dtype) - frequency * c


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 to rescale logits, got {temperature}")
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th are kept, as HF); top_k 0 is off."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filtering with HF semantics.

    Sort ascending and drop tokens whose cumulative probability is <= 1 - top_p, so the kept set is
    the smallest head whose mass reaches top_p; the most likely ``min_tokens_to_keep`` always stay.
    """
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cum <= 1 - top_p
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float | None, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the top probability (HF MinPLogitsWarper)."""
    if not min_p:
        return logits
    probs = logits.softmax(dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    # Whatever the threshold, the most likely min_tokens_to_keep tokens survive.
    top = torch.topk(probs, min_tokens_to_keep, dim=-1).indices
    remove.scatter_(-1, top, False)
    return logits.masked_fill(remove, NEG_INF)


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_counts: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """The processor stage: repetition penalty over prompt+generated ids, then presence/frequency
    penalties over generated ids only (the OpenAI-server convention)."""
    if params.needs_seen:
        if seen_counts is None:
            raise ValueError("repetition_penalty needs the counts of the ids seen so far")
        logits = apply_repetition_penalty(logits, seen_counts, params.repetition_penalty)
    if params.needs_output_counts:
        if output_counts is None:
            raise ValueError("presence/frequency penalties need the counts of the generated ids")
        logits = apply_presence_frequency_penalty(
            logits, output_counts, params.presence_penalty, params.frequency_penalty
        )
    return logits


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The warper stage, in HF order: temperature -> top-k -> top-p -> min-p. A no-op when greedy."""
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


def sample(logits: torch.Tensor, do_sample: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one id per row of logits [..., V]: argmax when greedy, else a draw from softmax(logits).

    With ``generator`` the draw is reproducible; without it torch's global RNG is used, so
    ``torch.manual_seed`` works as usual.
    """
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    ids = torch.multinomial(flat, num_samples=1, generator=generator)
    return ids.reshape(probs.shape[:-1])


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen_counts: torch.Tensor | None = None,
    output_counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Penalties, warpers and the draw in one call: logits [B, V] -> ids [B]."""
    logits = apply_penalties(logits.float(), params, seen_counts, output_counts)
    return sample(warp(logits, params), not params.greedy, generator)
