"""Evaluation: the official eval/ scripts' benchmarks on any checkpoint (``qwen eval``; docs/evaluation.md).

So far: MMLU, C-Eval and CMMLU for base models (``multiple_choice``). The chat variants, GSM8K,
HumanEval, the plugin benchmark, the lm-eval adapter and perplexity by context length are not
written yet.
"""
