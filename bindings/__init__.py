"""Python API over llama-cpp-python built from the patched llama.cpp (``qwen35.bindings``).

Importing :mod:`qwen35.native` loads the native library and checks that it carries
this toolkit's patch series.
"""
