"""Sampling transforms: hand-computed expectations, HF parity, and the draw."""

from __future__ import annotations

import math

import pytest
import torch

from qwen.sampling import (
    SamplingParams,
    apply_min_p,
    apply_penalties,
    apply_presence_frequency_penalty,
    apply_repetition_penalty,
    apply_temperature,
    apply_top_k,
    apply_top_p,
    sample,
    sample_next,
    token_counts,
    warp,
)

INF = float("inf")


def logits_of(probs: list[float]) -> torch.Tensor:
    return torch.tensor([probs]).log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


# ------------------------------------------------------------------ penalties
def test_token_counts_with_mask() -> None:
    ids = torch.tensor([[3, 1, 3, 0], [2, 2, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    counts = token_counts(ids, 5, mask)
    assert counts.tolist() == [[0, 1, 0, 2, 0], [0, 0, 2, 0, 0]]
    assert token_counts(ids, 5).tolist() == [[1, 1, 0, 2, 0], [0, 0, 4, 0, 0]]


def test_repetition_penalty_hand_computed() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    counts = token_counts(torch.tensor([[0, 1, 1], [3, 3, 3]]), 4)
    out = apply_repetition_penalty(logits, counts, 2.0)
    # negative logits are multiplied, positive ones divided; unseen ids untouched; once is enough
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0], [2.0, -1.0, 0.5, 1.5]]
    assert apply_repetition_penalty(logits, counts, 1.0) is logits


def test_repetition_penalty_matches_hf() -> None:
    hf = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 12), generator=g)
    for p in (0.7, 1.1, 1.3):
        ours = apply_repetition_penalty(logits, token_counts(ids, 50), p)
        ref = hf.RepetitionPenaltyLogitsProcessor(p)(ids, logits.clone())
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_presence_frequency_penalties() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    counts = torch.tensor([[0, 1, 3]])
    out = apply_presence_frequency_penalty(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.75]]


def test_apply_penalties_requires_counts() -> None:
    logits = torch.zeros(1, 4)
    with pytest.raises(ValueError):
        apply_penalties(logits, SamplingParams(repetition_penalty=1.2))
    with pytest.raises(ValueError):
        apply_penalties(logits, SamplingParams(presence_penalty=0.5))
    assert apply_penalties(logits, SamplingParams()) is logits


# ------------------------------------------------------------------ warpers
def test_temperature() -> None:
    logits = torch.tensor([[1.0, -2.0, 4.0]])
    assert apply_temperature(logits, 0.5).tolist() == [[2.0, -4.0, 8.0]]
    assert apply_temperature(logits, 1.0) is logits
    with pytest.raises(ValueError):
        apply_temperature(logits, 0.0)


def test_top_k_zero_is_off_and_ties_are_kept() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert apply_top_k(logits, 0) is logits
    assert apply_top_k(logits, 10) is logits
    assert kept(apply_top_k(logits, 1)) == [1, 3]  # both values equal to the 1st largest survive
    assert kept(apply_top_k(logits, 3)) == [1, 2, 3]
    assert apply_top_k(logits, 3)[0, 0].item() == -INF


def test_top_p_hand_computed() -> None:
    logits = logits_of([0.6, 0.3, 0.1])
    # ascending cumulative probs: 0.1, 0.4, 1.0; remove those <= 1 - top_p
    assert kept(apply_top_p(logits, 0.5)) == [0]
    assert kept(apply_top_p(logits, 0.65)) == [0, 1]
    assert kept(apply_top_p(logits, 0.95)) == [0, 1, 2]
    # top_p 0 keeps only the most likely token; 1.0 is off (even with -inf present)
    assert kept(apply_top_p(logits, 0.0)) == [0]
    with_inf = torch.tensor([[0.0, -INF, 1.0]])
    assert apply_top_p(with_inf, 1.0) is with_inf
    # min_tokens_to_keep
    assert kept(apply_top_p(logits, 0.0, min_tokens_to_keep=2)) == [0, 1]


def test_top_p_batch_rows_independent() -> None:
    logits = torch.cat([logits_of([0.6, 0.3, 0.1]), logits_of([0.1, 0.3, 0.6])])
    out = apply_top_p(logits, 0.65)
    assert torch.isfinite(out).tolist() == [[True, True, False], [False, True, True]]


def test_min_p() -> None:
    logits = logits_of([0.5, 0.3, 0.15, 0.05])
    assert kept(apply_min_p(logits, 0.2)) == [0, 1, 2]  # threshold 0.1
    assert kept(apply_min_p(logits, 0.9)) == [0]
    assert apply_min_p(logits, None) is logits
    assert apply_min_p(logits, 0.0) is logits


def test_warpers_match_hf() -> None:
    hf = pytest.importorskip("transformers.generation.logits_process")
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        logits = torch.randn(4, 64, generator=g) * 3
        ids = torch.zeros(4, 1, dtype=torch.long)
        for k in (1, 5, 40):
            torch.testing.assert_close(apply_top_k(logits, k), hf.TopKLogitsWarper(k)(ids, logits.clone()))
        for p in (0.1, 0.5, 0.8, 0.95):
            torch.testing.assert_close(apply_top_p(logits, p), hf.TopPLogitsWarper(p)(ids, logits.clone()))
        for m in (0.05, 0.3):
            torch.testing.assert_close(apply_min_p(logits, m), hf.MinPLogitsWarper(m)(ids, logits.clone()))
        # the full chain in HF order: temperature -> top_k -> top_p
        params = SamplingParams(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
        ref = logits.clone()
        for w in (hf.TemperatureLogitsWarper(0.7), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.8)):
            ref = w(ids, ref)
        torch.testing.assert_close(warp(logits, params), ref)


def test_warp_is_noop_when_greedy() -> None:
    logits = torch.randn(2, 10)
    assert warp(logits, SamplingParams(do_sample=False, top_k=1, temperature=0.3)) is logits
    assert warp(logits, SamplingParams(do_sample=True, temperature=0.0)) is logits


# ------------------------------------------------------------------ sampling
def test_greedy_is_argmax() -> None:
    logits = torch.randn(3, 5, 40)
    assert torch.equal(sample(logits, do_sample=False), logits.argmax(-1))


def test_seeded_sampling_is_reproducible() -> None:
    logits = torch.randn(4, 100)
    a = sample(logits, True, torch.Generator().manual_seed(7))
    b = sample(logits, True, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    draws = {tuple(sample(logits, True, torch.Generator().manual_seed(s)).tolist()) for s in range(8)}
    assert len(draws) > 1
    torch.manual_seed(3)
    c = sample(logits, True)
    torch.manual_seed(3)
    assert torch.equal(c, sample(logits, True))


def test_sampling_respects_removed_tokens() -> None:
    logits = torch.tensor([[0.0, 0.0, -INF, 0.0]]).expand(500, 4)
    ids = sample(logits, True, torch.Generator().manual_seed(0))
    assert set(ids.tolist()) == {0, 1, 3}


def test_sampled_frequencies_follow_softmax() -> None:
    probs = torch.tensor([0.7, 0.2, 0.1])
    ids = sample(probs.log().expand(20000, 3), True, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=3).float() / ids.numel()
    assert torch.allclose(freq, probs, atol=0.02)


def test_temperature_towards_zero_equals_argmax() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 200, generator=g)
    greedy = logits.argmax(-1)
    assert torch.equal(sample_next(logits, SamplingParams(do_sample=True, temperature=0.0)), greedy)
    cold = sample_next(logits, SamplingParams(do_sample=True, temperature=1e-4), torch.Generator().manual_seed(1))
    assert torch.equal(cold, greedy)
    assert torch.equal(sample_next(logits, SamplingParams(do_sample=True, top_k=1), torch.Generator()), greedy)


def test_sample_next_applies_penalty_before_argmax() -> None:
    logits = torch.tensor([[2.0, 1.5, 0.0]])
    counts = token_counts(torch.tensor([[0]]), 3)
    params = SamplingParams(repetition_penalty=2.0)
    assert sample_next(logits, params, seen_counts=counts).item() == 1  # 2.0 / 2 < 1.5


@pytest.mark.parametrize(
    "kwargs", [dict(temperature=-1.0), dict(top_k=-1), dict(top_p=1.5), dict(min_p=2.0), dict(repetition_penalty=0.0)]
)
def test_params_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_greedy_flag() -> None:
    assert SamplingParams().greedy
    assert not SamplingParams(do_sample=True).greedy
    assert SamplingParams(do_sample=True, temperature=0).greedy
    assert math.isclose(SamplingParams(top_p=0.8).top_p, 0.8)
