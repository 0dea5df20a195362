"""Conversion of trained MU-LLaMA checkpoints into runtime formats (GGUF for llama.cpp, ONNX, bundles).

Import the submodules directly (``export.gguf_export``, ``export.quantize``, ...): this package
imports nothing heavy on its own.
"""
