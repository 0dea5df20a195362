"""Tests of mullama_sdk.prompt: the prompt must be byte-for-byte the one MU-LLaMA was trained with."""

from __future__ import annotations

import pytest

from mullama_sdk.prompt import CAPTION_QUESTIONS, DEFAULT_QUESTION, format_prompt

# Written out independently of PROMPT_TEMPLATE, from docs/model.md section 4 (including the
# "<built-in function input>" quirk and no space after "### Response:").
EXPECTED_DESCRIBE = (
    b"Below is an instruction that describes a task, paired with an input that provides further context. "
    b"Write a response that appropriately completes the request.\n"
    b"\n"
    b"### Instruction:\n"
    b"Describe the audio\n"
    b"\n"
    b"### Input:\n"
    b"<built-in function input>\n"
    b"\n"
    b"### Response:"
)


def test_prompt_is_byte_exact():
    assert format_prompt("Describe the audio").encode("utf-8") == EXPECTED_DESCRIBE


def test_default_question():
    assert DEFAULT_QUESTION == "Describe the audio"
    assert format_prompt().encode("utf-8") == EXPECTED_DESCRIBE
    assert format_prompt(None) == format_prompt("Describe the audio")


def test_no_bos_and_nothing_after_response():
    prompt = format_prompt("What do you hear in the audio?")
    assert prompt.startswith("Below is an instruction")
    assert prompt.endswith("\n\n### Response:")
    assert "<s>" not in prompt


@pytest.mark.parametrize(
    "question",
    [
        "What do you hear in the audio?",
        "Is the tempo fast?\nAnswer in one word.",  # newlines are kept as they are
        "  leading and trailing spaces  ",
        "Mélodie à {0} temps, {key}?",  # braces in the question are not format fields
    ],
)
def test_question_is_inserted_verbatim(question):
    expected = EXPECTED_DESCRIBE.replace(b"Describe the audio", question.encode("utf-8"))
    assert format_prompt(question).encode("utf-8") == expected


def test_caption_questions():
    assert CAPTION_QUESTIONS == (
        "Describe the audio",
        "Describe the audio in detail",
        "What do you hear in the audio?",
        "What can be inferred from the audio?",
    )


@pytest.mark.parametrize("question", ["", " ", "\n\t "])
def test_empty_question_is_rejected(question):
    with pytest.raises(ValueError, match="non-empty"):
        format_prompt(question)


@pytest.mark.parametrize("question", [123, b"Describe the audio", ["Describe the audio"]])
def test_non_string_question_is_rejected(question):
    with pytest.raises(ValueError, match="string"):
        format_prompt(question)
