"""Evaluation: the official eval/ scripts' benchmarks on any checkpoint (``qwen eval``; docs/evaluation.md).

So far: MMLU, C-Eval and CMMLU for base models (``multiple_choice``) and perplexity by context
length with dynamic NTK / LogN on and off (``perplexity``). The chat variants, GSM8K, HumanEval, the
plugin benchmark and the lm-eval adapter are not written yet.
"""
