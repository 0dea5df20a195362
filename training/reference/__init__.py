"""The torch reference of MU-LLaMA: the model every export is verified against, and its loaders.

Dims (``dims``), the modules (``adapter``, ``mert``, ``llama``, ``model``), the published checkpoint
layout and strict loading (``checkpoint_layout``, ``state_dict``); from files to a model: checkpoint
files and the one ``torch.load`` gate (``loading``), Meta LLaMA folder layouts (``llama_folder``),
every tensor of a model checked for agreement (``model_sources``), the model built from them
(``build``: ``load_reference``); the tokenizer, and the greedy reference command (``greedy``).
Nothing here trains.
"""
