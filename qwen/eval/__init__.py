"""Evaluation: the official eval/ scripts' benchmarks on any checkpoint (``qwen eval``; docs/evaluation.md).

- ``multiple_choice``: MMLU, C-Eval, CMMLU for base models (next-token scoring of the letters);
  ``chat_choice``: their chat variants (generated replies, the official extraction cascades);
- ``gsm8k``, ``humaneval`` (programs run in ``qwen.sandbox``), ``plugin`` (tool use);
- ``perplexity``: perplexity by context length, dynamic NTK / LogN on and off;
- ``generation``: batched greedy generation shared by the generative tasks; ``report``: tables and
  bar charts comparing runs; ``harness``: the lm-evaluation-harness model adapter.
"""
