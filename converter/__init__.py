"""Hugging Face safetensors to GGUF conversion for Qwen3.5 (``qwen35.converter``)."""
