"""Incremental detokenization: the text each new token completes, in O(1) per token, for every streaming entry
point (API, server, UI).

transformers' `TextStreamer` decodes the whole row again for every token and prints; what is ours is the windowed
prefix/read offsets (vLLM's scheme), so a long answer costs the same per token as a short one."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    """Feed token ids one at a time; `push` returns the new text, holding back an incomplete multi-byte character
    until the next token completes it; `flush` returns what is still held back. The pieces join to the decoded row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window decoded before the new tokens
        self._read = 0  # tokens whose text has been returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> str:
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return after[len(before) :]

    def push(self, token: int) -> str:
        """Add one token; the text it completes (often "" inside a multi-byte character)."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """The text still held back at the end of the row."""
        return self._advance(final=True)
