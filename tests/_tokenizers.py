"""Tiny tokenizers in the layouts of the published base models, trained here (nothing downloaded).

`build_sentencepiece_phi3_tokenizer`: a SentencePiece BPE with byte fallback and Phi-3's 11 added tokens
(as the fixture `tiny_phi3`); `build_bpe_chat_tokenizer`: a byte-level BPE with Qwen2.5's or Phi-4's chat tokens.
Both return a folder that `AutoTokenizer.from_pretrained` loads.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Literal

import sentencepiece as spm
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Phi-3-mini's added tokens in its order (ids 32000... there), with their rstrip flag.
PHI3_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", False),
    ("<|assistant|>", True),
    ("<|placeholder1|>", True),
    ("<|placeholder2|>", True),
    ("<|placeholder3|>", True),
    ("<|placeholder4|>", True),
    ("<|system|>", True),
    ("<|end|>", True),
    ("<|placeholder5|>", True),
    ("<|placeholder6|>", True),
    ("<|user|>", True),
)
CHAT_SPECIAL_TOKENS = {
    "qwen": ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
    "phi4": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"),
}

_WORDS = (
    "the a an is are was of in on to and with without this that what which where how image scan CT MRI "
    "chest lung liver heart brain lesion mass nodule abnormality seen shown visible left right upper lower "
    "describe location size cm mm patient findings normal abnormal contrast slice axial reconstruct "
    "You assistant helpful AI answer question modality X-ray ultrasound 1 2 3 4 5 6 7 8 9 0 . , ? ( )"
).split()


def corpus(num_lines: int = 200, seed: int = 0) -> list[str]:
    """Deterministic pseudo-medical sentences to train the tiny tokenizers on."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14))) for _ in range(num_lines)]


def _added_token_entry(content: str, *, rstrip: bool = False, special: bool = True) -> dict[str, object]:
    """One `added_tokens_decoder` entry of a `tokenizer_config.json`."""
    return {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": rstrip,
        "single_word": False,
        "special": special,
    }


def build_sentencepiece_phi3_tokenizer(
    directory: str | Path, *, add_bos_token: bool = False, vocab_size: int = 320
) -> Path:
    """A Phi-3-layout LlamaTokenizer folder: SentencePiece BPE (byte fallback, dummy prefix) + Phi-3 tokens.

    Settings follow the fixture README (identity normalisation, split digits, whitespace-only pieces,
    unk/bos/eos = 0/1/2, no pad); `legacy=False`, bos `<s>`, eos and pad `<|endoftext|>`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        max_sentencepiece_length=16,
        split_by_unicode_script=True,
        split_by_number=True,
        split_by_whitespace=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    decoder = {
        "0": _added_token_entry("<unk>"),
        "1": _added_token_entry("<s>"),
        "2": _added_token_entry("</s>", rstrip=True, special=False),
    }
    for offset, (content, rstrip) in enumerate(PHI3_ADDED_TOKENS):
        decoder[str(vocab_size + offset)] = _added_token_entry(content, rstrip=rstrip)
    config = {
        "add_bos_token": add_bos_token,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "clean_up_tokenization_spaces": False,
        "legacy": False,
        "model_max_length": 4096,
        "padding_side": "left",
        "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def build_bpe_chat_tokenizer(
    directory: str | Path, style: Literal["qwen", "phi4"] = "qwen", vocab_size: int = 400
) -> Path:
    """A byte-level BPE (no prefix space) whose chat tokens follow the model vocabulary, as in Qwen2.5/Phi-4.

    qwen: eos `<|im_end|>`, pad `<|endoftext|>`, no BOS; phi4: bos/pad `<|endoftext|>`, eos `<|im_end|>`.
    """
    if style not in CHAT_SPECIAL_TOKENS:
        raise ValueError(f"unknown style {style!r}; known: {sorted(CHAT_SPECIAL_TOKENS)}")
    directory = Path(directory)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(
        corpus(),
        trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        ),
    )
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CHAT_SPECIAL_TOKENS[style]])
    named = (
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        if style == "qwen"
        else {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    )
    PreTrainedTokenizerFast(tokenizer_object=raw, add_bos_token=False, **named).save_pretrained(directory)
    return directory
