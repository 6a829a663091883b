"""Test support, not part of the installed package: tiny random-weight Qwen3.5 checkpoints
(``tiny``) and the pinned upstream converter (``upstream``), also used by bench/ and by the demo
checkpoints' training script (examples/models/train.py)."""
