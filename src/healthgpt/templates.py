"""Chat templates of the published HealthGPT variants and prompt building (REFERENCE §4, §1.7, §3.4).

The templates reproduce LLaVA's `Conversation.get_prompt` for the MPT and QWEN_2 separator styles: the
prompt is `system_tag + system + sep`, then `role + content + sep` per finished turn, then the assistant
role tag when a reply is wanted. (QWEN_2 with `sep == sep2` renders exactly like MPT.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from healthgpt.errors import HealthGPTError
from healthgpt.tokens import IMAGE_PLACEHOLDER, START_IMAGE

__all__ = [
    "ChatTemplate",
    "PromptError",
    "TEMPLATES",
    "chat_prompt",
    "get_template",
    "place_images",
    "user_content",
]


class PromptError(HealthGPTError):
    """A question or conversation that cannot be turned into a prompt."""


@dataclass(frozen=True)
class ChatTemplate:
    """One LLaVA-style two-role conversation format with its published default system prompt."""

    name: str
    default_system: str
    stop_strings: tuple[str, ...]
    system_tag: str
    user_tag: str
    assistant_tag: str
    sep: str

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        system: str | None = None,
        add_generation_prompt: bool = True,
    ) -> str:
        """Render alternating user/assistant messages (user first) as LLaVA's `get_prompt` would.

        With `add_generation_prompt` the last message must be the user's and the prompt ends with the
        assistant tag; without it every message is closed by its separator.
        """
        if not messages:
            raise PromptError("a conversation needs at least one user message")
        tags = {"user": self.user_tag, "assistant": self.assistant_tag}
        parts = [self.system_tag, self.default_system if system is None else system, self.sep]
        for i, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            expected = "user" if i % 2 == 0 else "assistant"
            if role != expected:
                raise PromptError(
                    f"message {i} has role {role!r}, expected {expected!r}: messages must alternate "
                    "user/assistant starting with the user (pass the system prompt as `system=`)"
                )
            if not isinstance(content, str) or not content.strip():
                # LLaVA would render an empty message as a bare role tag without separator: refuse instead.
                raise PromptError(f"message {i} ({role}) is empty")
            parts += [tags[role], content, self.sep]
        if add_generation_prompt:
            if messages[-1]["role"] != "user":
                raise PromptError("add_generation_prompt needs a conversation ending with a user message")
            parts.append(self.assistant_tag)
        return "".join(parts)


TEMPLATES: Mapping[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="phi3_instruct",
            default_system="You are a helpful AI assistant.",
            stop_strings=("<|end|>", "<|endoftext|>", "<|assistant|>"),
            system_tag="<|system|>\n",
            user_tag="\n<|user|>\n",
            assistant_tag="\n<|assistant|>\n",
            sep="<|end|>",
        ),
        ChatTemplate(
            name="phi4_instruct",
            # Upstream leftover from the Phi-4 model card, kept as the compatibility default (REFERENCE §4).
            default_system="You are a medieval knight and must provide explanations to modern people.",
            stop_strings=("<|im_end|>", "<|endoftext|>"),
            system_tag="<|im_start|>system<|im_sep|>\n",
            user_tag="\n<|im_start|>user<|im_sep|>\n",
            assistant_tag="\n<|im_start|>assistant<|im_sep|>\n",
            sep="<|im_end|>",
        ),
        ChatTemplate(
            name="qwen_2",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
            stop_strings=("<|im_end|>", "<|endoftext|>"),
            system_tag="<|im_start|>system\n",
            user_tag="<|im_start|>user\n",
            assistant_tag="<|im_start|>assistant\n",
            sep="<|im_end|>\n",
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    """The chat template called `name`; a clear error lists the known names."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown chat template {name!r}; known templates: {known}") from None


def _check_text(text: str, what: str) -> None:
    """Refuse empty text and text carrying its own image placeholder."""
    if not text.strip():
        raise PromptError(f"the {what} is empty")
    if IMAGE_PLACEHOLDER in text:
        raise PromptError(
            f"the {what} contains {IMAGE_PLACEHOLDER!r}: images are passed separately (num_images), "
            "the placeholder is inserted for you"
        )


def user_content(question: str, num_images: int, *, images_after_text: bool = False) -> str:
    """The user turn as the published code builds it: one `<image>\\n` per image, then the question; with
    `images_after_text`, the question, then one `\\n<image>` per image."""
    _check_text(question, "question")
    if num_images < 0:
        raise PromptError(f"num_images must be >= 0, got {num_images}")
    return place_images(question, num_images, images_after_text)


def place_images(text: str, num_images: int, after_text: bool) -> str:
    """`text` with `num_images` placeholders before it (`<image>\\n` each) or after it (`\\n<image>` each)."""
    if after_text:
        return text + f"\n{IMAGE_PLACEHOLDER}" * num_images
    return f"{IMAGE_PLACEHOLDER}\n" * num_images + text


def chat_prompt(
    template: str | ChatTemplate,
    messages: Sequence[Mapping[str, str]],
    *,
    num_images: int = 1,
    system: str | None = None,
    image_generation: bool = False,
    images_after_text: bool = False,
) -> str:
    """The full prompt for a user/assistant conversation whose first user turn shows `num_images` images.

    The images go into the first user turn (LLaVA multi-turn convention); a later turn carrying its own `<image>`
    is refused here, before tokenization. `image_generation` appends
    `<start_index>` after the assistant tag so the first generated token is an image code (REFERENCE §3.4).
    `images_after_text` puts the images after the first turn's text (`HealthGPTConfig.images_after_text`).
    """
    chat = get_template(template) if isinstance(template, str) else template
    if not messages:
        raise PromptError("a conversation needs at least one user message")
    first = {
        **messages[0],
        "content": user_content(messages[0]["content"], num_images, images_after_text=images_after_text),
    }
    for i, message in enumerate(messages[1:], start=1):
        _check_text(str(message.get("content", "")), f"message {i} ({message.get('role')})")
    prompt = chat.render([first, *messages[1:]], system=system)
    return prompt + START_IMAGE if image_generation else prompt
