"""Image-token vocabulary and prompt ids against the published ids and ids built by hand (REFERENCE §1.6, §1.7)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from _tokenizers import PHI3_ADDED_TOKENS, build_bpe_chat_tokenizer, build_sentencepiece_phi3_tokenizer
from conftest import turns
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from healthgpt.templates import chat_prompt
from healthgpt.tokens import (
    IMAGE_TOKEN_INDEX,
    ImageVocab,
    PromptTokenizer,
    add_image_tokens,
    code_token,
    image_vocab_of,
)

FIXTURE = Path(os.environ.get("HEALTHGPT_FIXTURES", "/work/shared/fixtures")) / "published-m3-comprehension"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason="published fixture not available")
SP_VOCAB = 320  # vocab_size of build_sentencepiece_phi3_tokenizer: Phi-3's added tokens start here
SYSTEM = "You are a helpful AI assistant."
QUESTION = "Describe  the lesion (size ≈ 3.5 cm) in the chest CT image."


def _case(path: str) -> dict:
    return json.loads((FIXTURE / "case_a_m3_com" / path).read_text())


# ---------------------------------------------------------------- published fixture (tiny_phi3)


@pytest.fixture
def phi3_fixture_tokenizer():
    tokenizer = AutoTokenizer.from_pretrained(FIXTURE / "tiny_phi3")
    add_image_tokens(tokenizer, 8192)
    return tokenizer


@needs_fixture
def test_image_token_ids_match_published(phi3_fixture_tokenizer) -> None:
    tok = phi3_fixture_tokenizer
    assert len(tok) == 8718
    vocab = image_vocab_of(tok, 8192)
    assert vocab == ImageVocab(start_id=523, first_code_id=524, num_codes=8192, end_id=8716, newline_id=8717)
    names = ["<start_index>", "<idx_0>", "<idx_8191>", "<end_index>", "<pixel_newline>"]
    assert tok.convert_tokens_to_ids(names) == [523, 524, 524 + 8191, 8716, 8717]


@needs_fixture
def test_prompt_ids_match_published(phi3_fixture_tokenizer) -> None:
    image, text_only = _case("outputs.json"), _case("text_only/outputs.json")
    prompt_tokenizer = PromptTokenizer(phi3_fixture_tokenizer)  # add_bos read from the config: False
    assert prompt_tokenizer.encode_prompt(image["prompt"]) == image["input_ids"]
    assert prompt_tokenizer.encode_prompt(text_only["prompt"]) == text_only["input_ids"]


@needs_fixture
@pytest.mark.parametrize("add_bos", [False, True])
def test_prompt_ids_match_published_variants(phi3_fixture_tokenizer, add_bos: bool) -> None:
    expected = _case("tokenization_variants.json")[f"add_bos_token_{str(add_bos).lower()}"]
    question = _case("outputs.json")["question"]
    prompt_tokenizer = PromptTokenizer(phi3_fixture_tokenizer, add_bos=add_bos)
    prompts = {
        "case_a": chat_prompt("phi3_instruct", turns(question)),
        "case_a_text_only": chat_prompt("phi3_instruct", turns(question), num_images=0),
        "case_b": chat_prompt("phi3_instruct", turns("Reconstruct the image."), image_generation=True),
    }
    for case, prompt in prompts.items():
        assert prompt_tokenizer.encode_prompt(prompt) == expected[case], case


@needs_fixture
def test_explicit_sentencepiece_model_when_the_folder_has_none(tmp_path: Path) -> None:
    """A tokenizer saved without tokenizer.model falls back to its own ids (no leading 449) unless told."""
    folder = tmp_path / "no_spm"
    AutoTokenizer.from_pretrained(FIXTURE / "tiny_phi3").save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(folder)
    add_image_tokens(tok, 8192)
    image, variants = _case("outputs.json"), _case("tokenization_variants.json")
    assert PromptTokenizer(tok).encode_prompt(image["prompt"]) == variants["fast_ids"]["case_a"]
    explicit = PromptTokenizer(tok, sentencepiece_model=FIXTURE / "tiny_phi3" / "tokenizer.model")
    assert explicit.encode_prompt(image["prompt"]) == image["input_ids"]


@needs_fixture
def test_add_image_tokens_is_fast_and_decodable() -> None:
    tok = AutoTokenizer.from_pretrained(FIXTURE / "tiny_phi3")
    start = time.perf_counter()
    vocab = add_image_tokens(tok, 8192)
    assert time.perf_counter() - start < 2.0
    ids = tok.encode("hi<start_index><idx_5><idx_8191>there<end_index>", add_special_tokens=False)
    assert ids[-1] == vocab.end_id and vocab.start_id in ids
    assert [i for i in ids if vocab.is_code(torch.tensor(i))] == [vocab.first_code_id + 5, vocab.first_code_id + 8191]
    assert tok.decode(ids, skip_special_tokens=True) == tok.decode([i for i in ids if i < vocab.start_id])


# ---------------------------------------------------------------- vocabulary on self-trained tokenizers


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_sentencepiece_phi3_tokenizer(tmp_path_factory.mktemp("sp") / "tok")


@pytest.fixture(scope="module")
def bpe_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bpe")
    return {style: build_bpe_chat_tokenizer(root / style, style) for style in ("qwen", "phi4")}


def test_add_image_tokens_appends_in_order_and_is_idempotent(sp_folder: Path) -> None:
    tok = AutoTokenizer.from_pretrained(sp_folder)
    first = len(tok)
    assert image_vocab_of(tok, 16) is None
    vocab = add_image_tokens(tok, 16)
    assert vocab == ImageVocab(first, first + 1, 16, first + 17, first + 18)
    names = ["<start_index>", *(f"<idx_{k}>" for k in range(16)), "<end_index>", "<pixel_newline>"]
    assert tok.convert_tokens_to_ids(names) == list(range(first, first + 19))
    assert add_image_tokens(tok, 16) == vocab and len(tok) == first + 19
    assert image_vocab_of(tok, 16) == vocab
    ids = tok.encode("a<idx_3>b", add_special_tokens=False)
    assert first + 4 in ids and "<idx_3>" not in tok.decode(ids, skip_special_tokens=True)
    assert "<idx_3>" in tok.decode(ids)


def test_image_vocab_other_sizes_and_orders_are_refused(sp_folder: Path) -> None:
    tok = AutoTokenizer.from_pretrained(sp_folder)
    add_image_tokens(tok, 16)
    with pytest.raises(ValueError, match="19 of the 35"):
        image_vocab_of(tok, 32)  # only the first 16 codes exist
    with pytest.raises(ValueError, match="consecutive"):
        add_image_tokens(tok, 8)  # <end_index> is not right after <idx_7>
    reversed_tok = AutoTokenizer.from_pretrained(sp_folder)
    reversed_tok.add_tokens(["<pixel_newline>", "<end_index>", "<idx_1>", "<idx_0>", "<start_index>"], True)
    with pytest.raises(ValueError, match="consecutive"):
        image_vocab_of(reversed_tok, 2)
    partial = AutoTokenizer.from_pretrained(sp_folder)
    partial.add_tokens(["<start_index>"], special_tokens=True)
    with pytest.raises(ValueError, match="1 of the 5"):
        add_image_tokens(partial, 2)


def test_image_vocab_arithmetic_round_trips() -> None:
    vocab = ImageVocab(start_id=100, first_code_id=101, num_codes=64, end_id=165, newline_id=166)
    codes = torch.randint(0, 64, (3, 7), generator=torch.Generator().manual_seed(0))
    ids = vocab.codes_to_ids(codes)
    assert torch.equal(ids, codes + 101)
    assert torch.equal(vocab.ids_to_codes(ids), codes)
    probe = torch.tensor([99, 100, 101, 164, 165, 166])
    assert vocab.is_code(probe).tolist() == [False, False, True, True, False, False]
    with pytest.raises(ValueError, match="VQ codes"):
        vocab.codes_to_ids(torch.tensor([0, 64]))
    with pytest.raises(ValueError, match="not all ids"):
        vocab.ids_to_codes(torch.tensor([101, 165]))
    assert code_token(7) == "<idx_7>"


# ---------------------------------------------------------------- prompt ids built by hand (§1.7)


def _sentencepiece_pair(model: Path) -> tuple[spm.SentencePieceProcessor, spm.SentencePieceProcessor]:
    """The raw model as trained (dummy prefix on) and the same model with the dummy prefix off."""
    with_prefix = spm.SentencePieceProcessor(model_file=str(model))
    proto = sentencepiece_model_pb2.ModelProto.FromString(model.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    return with_prefix, spm.SentencePieceProcessor(model_proto=proto.SerializeToString())


def _join(parts: Sequence[int | str | list[int]], encode: Callable[[str], list[int]]) -> list[int]:
    """Hand-built ids: ints are kept, lists are kept, strings are encoded."""
    ids: list[int] = []
    for part in parts:
        ids += [part] if isinstance(part, int) else part if isinstance(part, list) else encode(part)
    return ids


def test_sentencepiece_prompt_ids_by_hand(sp_folder: Path) -> None:
    """Phi-3 rules: each chunk gets the dummy prefix (a lone ▁ before a special token), rstrip tokens eat the
    following newline, text right after them is encoded without prefix."""
    tok = AutoTokenizer.from_pretrained(sp_folder)
    vocab = add_image_tokens(tok, 16)
    on, off = _sentencepiece_pair(sp_folder / "tokenizer.model")
    added = {content: SP_VOCAB + i for i, (content, _) in enumerate(PHI3_ADDED_TOKENS)}
    system, user, end, assistant = (added[t] for t in ("<|system|>", "<|user|>", "<|end|>", "<|assistant|>"))
    lone = on.piece_to_id("▁")
    head = [lone, system, off.encode(SYSTEM), end, user]
    prompt_tokenizer = PromptTokenizer(tok)
    assert not prompt_tokenizer.add_bos

    def check(prompt: str, parts: list, bos: bool = False) -> None:
        expected = _join(parts, off.encode)
        assert PromptTokenizer(tok, add_bos=bos).encode_prompt(prompt) == expected

    check(
        chat_prompt("phi3_instruct", turns(QUESTION)),
        [*head, IMAGE_TOKEN_INDEX, on.encode("\n" + QUESTION), end, assistant],
    )
    check(
        chat_prompt("phi3_instruct", turns(QUESTION)),
        [1, *head, IMAGE_TOKEN_INDEX, on.encode("\n" + QUESTION), end, assistant],
        bos=True,
    )
    check(chat_prompt("phi3_instruct", turns(QUESTION), num_images=0), [*head, QUESTION, end, assistant])
    check(
        chat_prompt("phi3_instruct", turns(QUESTION), num_images=2, image_generation=True),
        [
            *head,
            IMAGE_TOKEN_INDEX,
            on.encode("\n"),
            IMAGE_TOKEN_INDEX,
            on.encode("\n" + QUESTION),
            end,
            assistant,
            vocab.start_id,
        ],
    )
    history = [("What modality is this?", " It is a CT scan. ")]
    check(
        chat_prompt("phi3_instruct", turns("Where is the mass?", history)),
        [
            *head,
            IMAGE_TOKEN_INDEX,
            on.encode("\nWhat modality is this?"),
            end,
            assistant,
            "It is a CT scan. ",
            end,
            user,
            "Where is the mass?",
            end,
            assistant,
        ],
    )
    # The lone ▁ goes only before 4.41's all_special_tokens (bos/eos/unk/pad and the image tokens).
    assert prompt_tokenizer.encode_text("<s>the mass") == [1, *off.encode("the mass")]
    assert prompt_tokenizer.encode_text("<start_index><idx_3>") == [vocab.start_id, vocab.first_code_id + 3]
    assert prompt_tokenizer.encode_text("<|user|>the mass") == [lone, user, *off.encode("the mass")]
    assert prompt_tokenizer.encode_text("") == []
    # "▁" typed in the text is a plain space for the slow tokenizer.
    assert prompt_tokenizer.encode_text("a▁b") == on.encode("a b")


@pytest.mark.parametrize("style", ["qwen", "phi4"])
def test_bpe_prompt_ids_by_hand(bpe_folders: dict[str, Path], style: str) -> None:
    """Byte-level BPE: each text piece between special tokens is encoded on its own, no prefix space."""
    folder = bpe_folders[style]
    raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(folder)
    vocab = add_image_tokens(tok, 8)
    sp = {t: raw.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|im_sep|>")}
    start, end, sep = sp["<|im_start|>"], sp["<|im_end|>"], sp["<|im_sep|>"]

    def encode(text: str) -> list[int]:
        return raw.encode(text, add_special_tokens=False).ids

    if style == "qwen":
        template, system = "qwen_2", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        parts = [
            start,
            f"system\n{system}",
            end,
            "\n",
            start,
            "user\n",
            IMAGE_TOKEN_INDEX,
            "\n" + QUESTION,
            end,
            "\n",
            start,
            "assistant\n",
            vocab.start_id,
        ]
    else:
        template, system = "phi4_instruct", "You are a medieval knight and must provide explanations to modern people."
        parts = [
            start,
            "system",
            sep,
            "\n" + system,
            end,
            "\n",
            start,
            "user",
            sep,
            "\n",
            IMAGE_TOKEN_INDEX,
            "\n" + QUESTION,
            end,
            "\n",
            start,
            "assistant",
            sep,
            "\n",
            vocab.start_id,
        ]
    prompt = chat_prompt(template, turns(QUESTION), image_generation=True)
    assert PromptTokenizer(tok).encode_prompt(prompt) == _join(parts, encode)
    if style == "phi4":
        assert PromptTokenizer(tok, add_bos=True).encode_prompt(prompt) == [sp["<|endoftext|>"], *_join(parts, encode)]
    else:
        with pytest.raises(ValueError, match="no BOS"):
            PromptTokenizer(tok, add_bos=True)


def test_encode_text_refuses_image_placeholder(bpe_folders: dict[str, Path]) -> None:
    prompt_tokenizer = PromptTokenizer(AutoTokenizer.from_pretrained(bpe_folders["qwen"]))
    with pytest.raises(ValueError, match="encode_prompt"):
        prompt_tokenizer.encode_text("<image>\nQ")


def test_explicit_model_without_dummy_prefix_is_refused(sp_folder: Path, tmp_path: Path) -> None:
    proto = sentencepiece_model_pb2.ModelProto.FromString((sp_folder / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    (tmp_path / "plain.model").write_bytes(proto.SerializeToString())
    shutil.copy(sp_folder / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    with pytest.raises(ValueError, match="dummy prefix"):
        PromptTokenizer(AutoTokenizer.from_pretrained(sp_folder), sentencepiece_model=tmp_path / "plain.model")
