"""The demo model: a small MU-LLaMA-architecture model trained here from rendered scores (data set,
encoder, LM, training, evaluation). ``examples/demo.py`` is the short usage example next to it.
"""
