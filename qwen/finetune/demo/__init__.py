"""Data and evaluation for the tiny "Qwen-Demo" chat model: a real-text corpus gathered from package
registries (corpus), a world-capitals table (facts), a bilingual synthetic task set with a
held-out split (synthetic), and the evaluation behind the model card's bars (evaluate)."""
