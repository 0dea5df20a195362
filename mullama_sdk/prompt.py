"""The MU-LLaMA prompt, byte for byte as the published model was trained with it.

The literal ``<built-in function input>`` is a quirk of the original code (it formatted Python's
``input`` builtin into the template); the model learned it, so we reproduce it exactly.
"""

from __future__ import annotations

PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{question}\n\n### Input:\n<built-in function input>\n\n### Response:"
)

DEFAULT_QUESTION = "Describe the audio"

#: The captioning questions of the MusicQA data (docs/model.md section 4).
CAPTION_QUESTIONS = (
    "Describe the audio",
    "Describe the audio in detail",
    "What do you hear in the audio?",
    "What can be inferred from the audio?",
)


def format_prompt(question: str | None = None) -> str:
    """Return the full prompt text for ``question`` (no BOS: the tokenizer adds it).

    Args:
        question: The instruction; ``None`` means :data:`DEFAULT_QUESTION`.

    Raises:
        ValueError: if the question is empty or only whitespace.
    """
    return PROMPT_TEMPLATE.format(question=check_question(DEFAULT_QUESTION if question is None else question))


def check_question(question: object) -> str:
    """Return ``question`` if it is a string with some non-space text, else raise ``ValueError`` saying so."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return question
