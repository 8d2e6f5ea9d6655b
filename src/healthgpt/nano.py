"""Randomly initialised components of the real architectures (Phi-3 / Qwen2 LLM, CLIP tower, byte-level BPE
tokenizer) built offline from a config: for the `nano` variant, the demo and the tests. Nothing is downloaded."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Phi3Config,
    Phi3ForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from .config import LLMConfig, VisionConfig
from .vision import VisionEncoder

# The special tokens each chat template needs; the first, `<|endoftext|>`, is eos and pad as in Phi-3/Qwen2.5.
CHAT_TOKENS = {
    "phi3_instruct": ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    "phi4_instruct": ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>"),
    "qwen_2": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
}

_SEED_CORPUS = (
    "You are a helpful AI assistant.",
    "Is there a lesion in this CT image? Yes, there is a lesion on the left side.",
    "What abnormality is seen in this MRI image of the brain? No abnormality is seen.",
    "Describe the findings. A 5 mm nodule is seen in the right lung.",
    "Reconstruct the image. Here is the reconstructed medical image you need.",
    "I need a version of this CT representation in MRI. The image has been transformed into MRI.",
    "How many lesions are there? There are two lesions.",
)


def train_bpe_tokenizer(
    corpus: Iterable[str], vocab_size: int, special_tokens: Iterable[str]
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (the family of Phi-4's and Qwen2.5's) trained in memory on `corpus`."""
    specials = list(special_tokens)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=specials[0],
        pad_token=specials[0],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def nano_tokenizer(
    vocab_size: int = 512, template: str = "phi3_instruct", corpus: Iterable[str] = _SEED_CORPUS
) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with the chat tokens of `template`."""
    return train_bpe_tokenizer(corpus, vocab_size, CHAT_TOKENS[template])


def random_llm(
    llm: LLMConfig,
    vocab_size: int,
    *,
    seed: int = 0,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> PreTrainedModel:
    """A randomly initialised `Phi3ForCausalLM` or `Qwen2ForCausalLM` of the given shape."""
    common = dict(
        vocab_size=vocab_size,
        hidden_size=llm.hidden_size,
        intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers,
        num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads,
        max_position_embeddings=llm.max_position_embeddings,
        rope_theta=llm.rope_theta,
        tie_word_embeddings=False,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    classes = {"phi3": (Phi3Config, Phi3ForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if llm.arch not in classes:
        raise ValueError(f"unsupported LLM architecture {llm.arch!r}; use 'phi3' or 'qwen2'")
    config_cls, model_cls = classes[llm.arch]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG state
        torch.manual_seed(seed)
        return model_cls(config_cls(**common))


def random_vision(vision: VisionConfig, *, seed: int = 0) -> VisionEncoder:
    """A randomly initialised CLIP vision tower of the given shape."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionEncoder.random(
            vision.image_size,
            vision.patch_size,
            vision.hidden_size,
            vision.num_layers,
            vision.num_heads,
            vision.intermediate_size,
        )
