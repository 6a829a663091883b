"""Qwen3.5 GGUF & llama.cpp bridge toolkit.

Subpackages: ``qwen35.converter`` (Hugging Face safetensors to GGUF) and ``qwen35.bindings``
(Python API over llama-cpp-python built from the patched llama.cpp in ``cpp_patches/``).
"""

__version__ = "0.1.0"
