"""The torch reference of MU-LLaMA: the model every export is verified against, and its loaders.

Dims (``dims``), the modules (``adapter``, ``mert``, ``llama``, ``model``), the published checkpoint
layout and strict loading (``checkpoint_layout``, ``state_dict``, ``loading``), the tokenizer, and the
greedy reference command (``greedy``). Nothing here trains.
"""
