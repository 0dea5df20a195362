"""Training side of mullama-sdk: the torch reference model of MU-LLaMA, its loaders and (later) recipes.

Everything here imports torch; the runtime (``mullama_sdk``) never imports this package.
"""
