"""Fine-tuning (SFT and continued pretraining) for first-generation Qwen models."""
