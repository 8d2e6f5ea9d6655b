"""Shared test fixtures: tiny random models of the real architectures, and the published-code fixture folder."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from _cli import write_bad_files
from _models import random_model

from healthgpt.api import HealthGPT
from healthgpt.config import GENERATION, get_variant
from healthgpt.data.image_codes import tokenize_images
from healthgpt.data.phantoms import make_dataset
from healthgpt.pretrain.nano import torch_threads
from healthgpt.vqgan import VQGAN

REPO = Path(__file__).resolve().parents[1]


def published_fixture_dir() -> Path:
    """`shared/fixtures/published-m3-comprehension` beside the checkout (override with HEALTHGPT_SHARED_DIR)."""
    shared = Path(os.environ.get("HEALTHGPT_SHARED_DIR", REPO.parent / "shared"))
    return shared / "fixtures" / "published-m3-comprehension"


@pytest.fixture(scope="session")
def published() -> Path:
    path = published_fixture_dir()
    if not path.is_dir():
        pytest.skip(f"the published-code fixture folder {path} is not beside this checkout (set HEALTHGPT_SHARED_DIR)")
    return path


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models run many times
    slower when two OpenMP threads fight other jobs for the two CI cores."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def nano() -> HealthGPT:
    """The nano variant with random weights; every plugin's B matrices made non-zero so plugins differ."""
    return random_model("nano", seed=0)


def tiny_config(arch: str):
    """A nano-sized config of the Phi-3 (m3/l14 family) or Qwen2 (xl32 family) architecture."""
    base = get_variant("nano")
    if arch == "phi3":
        return base
    return base.replace(
        name="tiny-qwen2",
        llm=base.llm.__class__(**{**base.llm.__dict__, "arch": "qwen2", "num_kv_heads": 2}),
        template="qwen_2",
        add_image_tokens=False,
        plugins={k: v for k, v in base.plugins.items() if k != GENERATION},
    )


def phantoms_with_codes(root: Path, seed: int) -> Path:
    """`root` holding four 64-pixel phantom cases (training split only) and, in `root/codes`, their target images
    encoded by a nano VQGAN with seeded random weights: the data of a short training stage."""
    make_dataset(root, 4, seed=seed, size=64, test_fraction=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vqgan = VQGAN.from_config(get_variant("nano").vq)
    tokenize_images(root / "train.json", vqgan, root / "codes")
    return root


def turns(question: str, history: Sequence[tuple[str, str]] = ()) -> list[dict[str, str]]:
    """Chat messages for `question` after earlier `(question, answer)` turns, as an API caller sends them."""
    messages = []
    for past_question, answer in history:
        messages += [{"role": "user", "content": past_question}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": question}]


@pytest.fixture()
def bad_files(tmp_path: Path) -> Path:
    """A folder of broken inputs, each named for what is wrong with it (the CLI's bad-input and bad-output tables)."""
    return write_bad_files(tmp_path)
