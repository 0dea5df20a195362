"""``mullama-train eval``: answers to MusicQA-format questions, scored in two labelled metric modes."""
