"""Test reference: transformers' Qwen2ForCausalLM carrying our weights (see qwen/interop.py for the mapping).

Valid only with NTK and LogN inactive (Qwen2 has neither); `rope_theta` lets a test give Qwen2 the
NTK-stretched base explicitly.
"""

from __future__ import annotations

from qwen.interop import to_transformers_qwen2


def qwen2_reference(model, rope_theta=None):  # type: ignore[no-untyped-def]
    return to_transformers_qwen2(model, rope_theta=rope_theta)
