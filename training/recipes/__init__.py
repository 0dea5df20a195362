"""MU-LLaMA's two training stages.

Typed recipe configs (``config``), MusicQA data (``data``), the MERT feature cache (``features``);
what the stages train and minimise (``parameters``, ``objective``, ``schedule``, ``initial_weights``);
the shared loop (``recipe``) with its RNG, multi-process and output-folder helpers (``random_state``,
``distributed``, ``run_folder``); the two stages (``stages``) and the command that launches them
(``launch``).
"""
