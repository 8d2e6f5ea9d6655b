"""Chat templates: the exact published strings (REFERENCE §4), overrides, multi-turn, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import turns

from healthgpt.templates import PromptError, chat_prompt, get_template, user_content

FIXTURE = Path(os.environ.get("HEALTHGPT_FIXTURES", "/work/shared/fixtures")) / "published-m3-comprehension"
Q = "What abnormality is seen in this CT image of the chest?"

# REFERENCE §4, with ⏎ written as \n.
PHI3 = "<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n<image>\n{q}<|end|>\n<|assistant|>\n"
PHI4 = (
    "<|im_start|>system<|im_sep|>\nYou are a medieval knight and must provide explanations to modern people."
    "<|im_end|>\n<|im_start|>user<|im_sep|>\n<image>\n{q}<|im_end|>\n<|im_start|>assistant<|im_sep|>\n"
)
QWEN = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<image>\n{q}<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.mark.parametrize(("name", "expected"), [("phi3_instruct", PHI3), ("phi4_instruct", PHI4), ("qwen_2", QWEN)])
def test_published_prompt_strings(name: str, expected: str) -> None:
    assert chat_prompt(name, turns(Q)) == expected.format(q=Q)
    assert chat_prompt(get_template(name), turns(Q)) == expected.format(q=Q)
    assert chat_prompt(name, turns(Q), num_images=0) == expected.format(q=Q).replace("<image>\n", "")
    assert chat_prompt(name, turns(Q), image_generation=True) == expected.format(q=Q) + "<start_index>"


@pytest.mark.skipif(not FIXTURE.is_dir(), reason="published fixture not available")
def test_prompt_equals_published_fixture() -> None:
    image = json.loads((FIXTURE / "case_a_m3_com" / "outputs.json").read_text())
    text_only = json.loads((FIXTURE / "case_a_m3_com" / "text_only" / "outputs.json").read_text())
    assert chat_prompt("phi3_instruct", turns(image["question"])) == image["prompt"]
    assert chat_prompt("phi3_instruct", turns(text_only["question"]), num_images=0) == text_only["prompt"]


def test_system_override() -> None:
    medical = "You are a helpful medical assistant."
    expected = PHI4.format(q=Q).replace(
        "You are a medieval knight and must provide explanations to modern people.", medical
    )
    assert chat_prompt("phi4_instruct", turns(Q), system=medical) == expected
    assert chat_prompt("qwen_2", turns(Q), num_images=0, system="") == (
        f"<|im_start|>system\n<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_multi_turn_images_in_first_turn_answers_closed_by_separator() -> None:
    history = [("Which modality is this?", "It is a CT scan.")]
    assert chat_prompt("phi3_instruct", turns("Where is the lesion?", history), num_images=2) == (
        "<|system|>\nYou are a helpful AI assistant.<|end|>"
        "\n<|user|>\n<image>\n<image>\nWhich modality is this?<|end|>"
        "\n<|assistant|>\nIt is a CT scan.<|end|>"
        "\n<|user|>\nWhere is the lesion?<|end|>"
        "\n<|assistant|>\n"
    )
    assert chat_prompt("qwen_2", turns("Where is the lesion?", history)) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhich modality is this?<|im_end|>\n"
        "<|im_start|>assistant\nIt is a CT scan.<|im_end|>\n"
        "<|im_start|>user\nWhere is the lesion?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_without_generation_prompt_closes_every_turn() -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert get_template("phi4_instruct").render(messages, add_generation_prompt=False, system="S") == (
        "<|im_start|>system<|im_sep|>\nS<|im_end|>\n<|im_start|>user<|im_sep|>\nHi<|im_end|>"
        "\n<|im_start|>assistant<|im_sep|>\nHello<|im_end|>"
    )


def test_user_content_puts_images_first() -> None:
    assert user_content("Q?", 3) == "<image>\n<image>\n<image>\nQ?"
    assert user_content("Q?", 0) == "Q?"


def test_images_after_text_end_the_first_turn() -> None:
    assert user_content("Q?", 2, images_after_text=True) == "Q?\n<image>\n<image>"
    assert user_content("Q?", 0, images_after_text=True) == "Q?"
    prompt = chat_prompt("phi3_instruct", turns("Q?"), images_after_text=True, image_generation=True)
    assert prompt == PHI3.replace("<image>\n{q}", "Q?\n<image>") + "<start_index>"


def test_stop_strings_contain_the_separator_token() -> None:
    assert get_template("phi3_instruct").stop_strings[0] == "<|end|>"
    assert get_template("phi4_instruct").stop_strings[0] == "<|im_end|>"
    assert get_template("qwen_2").stop_strings[0] == "<|im_end|>"


def test_errors() -> None:
    with pytest.raises(PromptError, match="empty"):
        chat_prompt("phi3_instruct", turns("  \n "))
    with pytest.raises(PromptError, match="images are passed separately"):
        chat_prompt("phi3_instruct", turns("<image>\nWhat is this?"))
    with pytest.raises(PromptError, match="images are passed separately"):
        chat_prompt("phi3_instruct", turns("And now?", [("Q", "see <image>")]))
    with pytest.raises(PromptError, match="num_images"):
        user_content("Q", -1)
    with pytest.raises(ValueError, match="phi3_instruct, phi4_instruct, qwen_2"):
        get_template("llama_2")
    chat = get_template("qwen_2")
    with pytest.raises(PromptError, match="expected 'user'"):
        chat.render([{"role": "assistant", "content": "A"}])
    with pytest.raises(PromptError, match="expected 'assistant'"):
        chat.render([{"role": "user", "content": "A"}, {"role": "user", "content": "B"}])
    with pytest.raises(PromptError, match="ending with a user message"):
        chat.render([{"role": "user", "content": "A"}, {"role": "assistant", "content": "B"}])
    with pytest.raises(PromptError, match="empty"):
        chat.render([{"role": "user", "content": ""}])
    assert issubclass(PromptError, ValueError)
