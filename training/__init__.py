"""Training side of mullama-sdk: the torch reference of MU-LLaMA, its loaders, data, recipes and evaluation.

Everything here imports torch; the runtime (``mullama_sdk``) never imports this package.
"""
