"""Image-token vocabulary (REFERENCE §1.6) and prompt ids as the published code computes them (§1.7)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sentencepiece as spm
from tokenizers import AddedToken
from torch import Tensor
from transformers.tokenization_python import Trie

IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
START_IMAGE = "<start_index>"
END_IMAGE = "<end_index>"
PIXEL_NEWLINE = "<pixel_newline>"

_SPIECE_UNDERLINE = "▁"
_CODE_TOKEN = re.compile(r"<idx_\d+>")

__all__ = [
    "END_IMAGE",
    "IGNORE_INDEX",
    "IMAGE_PLACEHOLDER",
    "IMAGE_TOKEN_INDEX",
    "ImageVocab",
    "PIXEL_NEWLINE",
    "PromptTokenizer",
    "START_IMAGE",
    "add_image_tokens",
    "code_token",
    "image_vocab_of",
]


def code_token(k: int) -> str:
    """The vocabulary token of VQ code `k`."""
    return f"<idx_{k}>"


def _image_token_names(num_codes: int) -> list[str]:
    """The image tokens in the published order: start, the codes, end, pixel newline."""
    return [START_IMAGE, *(code_token(k) for k in range(num_codes)), END_IMAGE, PIXEL_NEWLINE]


@dataclass(frozen=True)
class ImageVocab:
    """Ids of the image tokens; codes occupy `first_code_id ... first_code_id + num_codes - 1`."""

    start_id: int
    first_code_id: int
    num_codes: int
    end_id: int
    newline_id: int

    def is_code(self, ids: Tensor) -> Tensor:
        """Boolean mask of the ids that are VQ code tokens."""
        return (ids >= self.first_code_id) & (ids < self.first_code_id + self.num_codes)

    def codes_to_ids(self, codes: Tensor) -> Tensor:
        """Token ids of VQ codes (by arithmetic); codes outside `[0, num_codes)` raise."""
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_codes):
            lo, hi = int(codes.min()), int(codes.max())
            raise ValueError(f"VQ codes must lie in [0, {self.num_codes}), got values in [{lo}, {hi}]")
        return codes + self.first_code_id

    def ids_to_codes(self, ids: Tensor) -> Tensor:
        """VQ codes of code-token ids (by arithmetic); any other id raises."""
        if not bool(self.is_code(ids).all()):
            raise ValueError(
                f"not all ids are VQ code tokens (expected ids in [{self.first_code_id}, "
                f"{self.first_code_id + self.num_codes}))"
            )
        return ids - self.first_code_id


def image_vocab_of(tokenizer: Any, num_codes: int) -> ImageVocab | None:
    """The image vocabulary already in `tokenizer`, or None if it has none of the image tokens.

    Raises if only some are present or they are not at consecutive ids in the published order.
    """
    if num_codes <= 0:
        raise ValueError(f"num_codes must be positive, got {num_codes}")
    vocab = tokenizer.get_vocab()
    names = _image_token_names(num_codes)
    ids = [vocab.get(name) for name in names]
    found = sum(i is not None for i in ids)
    if found == 0:
        return None
    if found < len(names):
        raise ValueError(
            f"the tokenizer has {found} of the {len(names)} image tokens for num_codes={num_codes}; "
            "was it extended with another number of VQ codes?"
        )
    start = ids[0]
    if ids != list(range(start, start + len(names))):
        raise ValueError(
            f"the image tokens are in the tokenizer but not at consecutive ids in the order {START_IMAGE}, "
            f"{code_token(0)}..{code_token(num_codes - 1)}, {END_IMAGE}, {PIXEL_NEWLINE}"
        )
    return ImageVocab(start, start + 1, num_codes, start + num_codes + 1, start + num_codes + 2)


def add_image_tokens(tokenizer: Any, num_codes: int = 8192) -> ImageVocab:
    """Append the image tokens as special tokens at ids `len(tokenizer)...` (idempotent), REFERENCE §1.6.

    `add_tokens(..., special_tokens=True)` keeps each one a single token that
    `decode(skip_special_tokens=True)` drops, as 4.41's `additional_special_tokens` did.
    """
    existing = image_vocab_of(tokenizer, num_codes)
    if existing is not None:
        return existing
    first_id = len(tokenizer)
    names = _image_token_names(num_codes)
    tokenizer.add_tokens(
        [AddedToken(name, special=True, normalized=False, lstrip=False, rstrip=False) for name in names],
        special_tokens=True,
    )
    vocab = image_vocab_of(tokenizer, num_codes)
    if vocab is None or vocab.start_id != first_id:
        raise RuntimeError(f"the tokenizer did not place the image tokens at ids {first_id}...")
    return vocab


def _find_sentencepiece_model(tokenizer: Any) -> Path | None:
    """The SentencePiece `*.model` file the tokenizer was loaded from, if it can be found."""
    candidates = [getattr(tokenizer, "vocab_file", None), tokenizer.init_kwargs.get("vocab_file")]
    folder = Path(getattr(tokenizer, "name_or_path", "") or "")
    if folder.is_dir():
        candidates.append(folder / "tokenizer.model")
    for candidate in candidates:
        if candidate and str(candidate).endswith(".model") and Path(candidate).is_file():
            return Path(candidate)
    return None


def _load_without_dummy_prefix(path: Path) -> tuple[spm.SentencePieceProcessor, bool]:
    """The SentencePiece model at `path` with its dummy prefix switched off, and whether it had one."""
    # Local import: the protobuf bindings need the `protobuf` package, only for this slow path.
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(path.read_bytes())
    had_prefix = proto.normalizer_spec.add_dummy_prefix
    proto.normalizer_spec.add_dummy_prefix = False
    return spm.SentencePieceProcessor(model_proto=proto.SerializeToString()), had_prefix


class _SlowLlamaTokenizer:
    """transformers 4.41 `LlamaTokenizer(legacy=False)` tokenize + convert_tokens_to_ids, on sentencepiece.

    Written by hand because transformers 5 dropped that slow tokenizer; its tokenizers drop the leading
    `▁` of every chunk, which the published ids (and so the released weights) have.
    """

    def __init__(self, tokenizer: Any, sp: spm.SentencePieceProcessor) -> None:
        self.tokenizer = tokenizer
        self.sp = sp
        self.unk = str(tokenizer.unk_token)
        self.unk_length = len(self.sp.encode(self.unk))
        self._cached_len = -1
        self._refresh()

    def _refresh(self) -> None:
        """Rebuild the added-token tables when the tokenizer grew (e.g. after `add_image_tokens`)."""
        if self._cached_len == len(self.tokenizer):
            return
        decoder: Mapping[int, AddedToken] = self.tokenizer.added_tokens_decoder
        if any(token.single_word for token in decoder.values()):
            raise ValueError("single_word added tokens are not supported")
        self.added = {token.content: token for token in decoder.values()}
        self.added_ids = {token.content: i for i, token in decoder.items()}
        self.trie = Trie(self.added)
        # 4.41's `all_special_tokens`: bos/eos/unk/pad plus `additional_special_tokens`, which the published
        # code replaced by the image tokens; only these make a chunk's leading `▁` disappear.
        tok = self.tokenizer
        named = (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token)
        image = {START_IMAGE, END_IMAGE, PIXEL_NEWLINE}
        self.special = {str(t) for t in named if t is not None} | {
            t for t in self.added if t in image or _CODE_TOKEN.fullmatch(t)
        }
        self._cached_len = len(self.tokenizer)

    def _sp_tokenize(self, text: str) -> list[str]:
        """4.41 `LlamaTokenizer._tokenize`: text starting with a space is encoded after `unk`, then cut."""
        if not text.startswith((_SPIECE_UNDERLINE, " ")):
            return self.sp.encode(text, out_type=str)
        pieces = self.sp.encode(self.unk + text, out_type=str)
        return pieces[self.unk_length :] if len(pieces) >= self.unk_length else pieces

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without BOS/EOS."""
        if not text:
            return []
        self._refresh()
        parts = self.trie.split(_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " "))
        for i, part in enumerate(parts):
            token = self.added.get(part)
            if token is None:
                continue
            if token.rstrip and i + 1 < len(parts) and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
            if token.lstrip and i > 0 and parts[i - 1]:
                parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for part in parts:
            if part:
                tokens.extend([part] if part in self.added else self._sp_tokenize(part))
        if len(tokens) > 1 and tokens[0] == _SPIECE_UNDERLINE and tokens[1] in self.special:
            tokens = tokens[1:]
        return [self.added_ids[t] if t in self.added_ids else self.sp.piece_to_id(t) for t in tokens]


class PromptTokenizer:
    """Prompt string -> ids exactly as the published code (chunks split on <image>, joined by -200).

    SentencePiece tokenizers with a dummy prefix (Llama/Phi-3) go through the 4.41 slow algorithm; byte-level
    BPE tokenizers (Phi-4, Qwen2.5) through the tokenizer itself, which is already exact for them.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        sentencepiece_model: str | Path | None = None,
        add_bos: bool | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.add_bos = bool(getattr(tokenizer, "add_bos_token", False)) if add_bos is None else add_bos
        if self.add_bos and tokenizer.bos_token_id is None:
            raise ValueError("add_bos=True but the tokenizer has no BOS token")
        self._slow: _SlowLlamaTokenizer | None = None
        explicit = sentencepiece_model is not None
        path = Path(sentencepiece_model) if explicit else _find_sentencepiece_model(tokenizer)
        if path is not None:
            sp, had_prefix = _load_without_dummy_prefix(path)
            if had_prefix:
                self._slow = _SlowLlamaTokenizer(tokenizer, sp)
            elif explicit:
                raise ValueError(f"{path} has no dummy prefix: not a Llama/Phi-3 style SentencePiece model")

    def encode_text(self, text: str) -> list[int]:
        """Ids of one text chunk (no BOS), as the published slow tokenizer gives them."""
        if IMAGE_PLACEHOLDER in text:
            raise ValueError(f"text contains {IMAGE_PLACEHOLDER!r}: use encode_prompt for image prompts")
        if self._slow is not None:
            return self._slow.encode(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt ids: each `<image>` becomes IMAGE_TOKEN_INDEX, one BOS at the start when `add_bos`."""
        ids = [self.tokenizer.bos_token_id] if self.add_bos else []
        for i, chunk in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            if i:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(self.encode_text(chunk))
        return ids
