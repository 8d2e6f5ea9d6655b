"""Tokenizer training and causal-LM pre-training of a base LLM on a text corpus (plain text and chat turns).

Documents are tokenized once, joined with eos into one stream and cut into random windows, as GPT-style
pre-training does; chat conversations are rendered with the model's template so the LM learns its tags.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from healthgpt.nano import CHAT_TOKENS, train_bpe_tokenizer
from healthgpt.templates import get_template

from ._common import make_optimizer

log = logging.getLogger(__name__)

Conversation = Sequence[Mapping[str, str]]  # alternating {"role": "user"/"assistant", "content": ...}
Document = str | Conversation


def train_tokenizer(corpus: Iterable[str], vocab_size: int, template: str = "phi3_instruct") -> PreTrainedTokenizerFast:
    """Byte-level BPE of at most `vocab_size` tokens with `template`'s chat tokens (eos first), trained on `corpus`
    and the template's default system prompt."""
    if template not in CHAT_TOKENS:
        raise ValueError(f"no chat tokens known for template {template!r}; known: {', '.join(CHAT_TOKENS)}")
    return train_bpe_tokenizer([*corpus, get_template(template).default_system], vocab_size, CHAT_TOKENS[template])


def render_documents(documents: Iterable[Document], template: str | None) -> list[str]:
    """Plain strings as they are; conversations rendered by `template` with its default system prompt."""
    texts = []
    for doc in documents:
        if isinstance(doc, str):
            texts.append(doc)
        elif template is None:
            raise ValueError("the corpus holds conversations: pass the chat `template` to render them")
        else:
            texts.append(get_template(template).render(doc, add_generation_prompt=False))
    return texts


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> torch.Tensor:
    """All texts tokenized (no special tokens added), each followed by eos, as one 1-D LongTensor."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate documents")
    ids: list[int] = []
    for encoded in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        ids += [*encoded, eos]
    return torch.tensor(ids, dtype=torch.long)


def pretrain_lm(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Iterable[Document],
    *,
    template: str | None = "phi3_instruct",
    steps: int = 1000,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> PreTrainedModel:
    """Causal-LM training of `llm` in place on `corpus` (strings, or conversations rendered with `template`):
    each step takes `batch_size` random windows of `seq_len` tokens from the eos-joined stream. Returns `llm`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    stream = token_stream(tokenizer, render_documents(corpus, template))
    if len(stream) <= seq_len:
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    llm.to(device).train()
    optimizer, schedule = make_optimizer([p for p in llm.parameters() if p.requires_grad], lr, steps, 0.01)
    with torch.random.fork_rng(devices=[]):  # dropout, if the model has any, draws from a seeded private stream
        torch.manual_seed(seed)
        bar = tqdm(range(steps), desc="lm", disable=not progress)
        for _ in bar:
            starts = torch.randint(0, len(stream) - seq_len, (batch_size, 1), generator=generator)
            batch = stream[starts + offsets].to(device)  # (B, T)
            loss = llm(input_ids=batch, labels=batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    log.info("lm: %d steps, last loss %.3f", steps, loss.item())
    return llm.eval()


@torch.no_grad()
def perplexity(
    llm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Iterable[Document],
    *,
    template: str | None = "phi3_instruct",
    seq_len: int = 128,
    batch_size: int = 32,
) -> float:
    """exp(mean next-token NLL) over the eos-joined stream cut into consecutive windows of `seq_len` tokens."""
    stream = token_stream(tokenizer, render_documents(corpus, template))
    windows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    if not len(windows):
        raise ValueError(f"the corpus has {len(stream)} tokens, fewer than one window of seq_len={seq_len}")
    device = next(llm.parameters()).device
    was_training = llm.training
    llm.eval()
    total = 0.0
    for batch in windows.split(batch_size):
        logits = llm(input_ids=batch.to(device)).logits[:, :-1].float()  # (B, T-1, V)
        targets = batch[:, 1:].to(device)
        total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum").item()
    llm.train(was_training)
    return math.exp(total / (windows.shape[0] * (seq_len - 1)))
