"""Samples, collation, the image-code cache and the loss: checked against the inference prompt path and by hand."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from healthgpt.api import HealthGPT
from healthgpt.api.images import image_request
from healthgpt.config import COMPREHENSION, GENERATION, get_variant
from healthgpt.data.collate import collate, num_supervised
from healthgpt.data.image_codes import CodeCacheError, ImageCodeCache, tokenize_images
from healthgpt.data.records import DataError, load_records
from healthgpt.data.samples import SampleBuilder, TrainingDataset, build_samples, unconditional_twin
from healthgpt.model import expand_image_slots
from healthgpt.tasks import UNCONDITIONAL_INSTRUCTION
from healthgpt.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from healthgpt.vqgan import VQGAN

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def hg() -> HealthGPT:
    return HealthGPT.random("nano", seed=0)


@pytest.fixture(scope="module")
def vqgan(hg: HealthGPT) -> VQGAN:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return VQGAN.from_config(hg.config.vq).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    for name in ("ct.png", "mri.png", "big.png"):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / name)
    records = [
        {"id": "vqa", "image": "ct.png", "conversations": _turns("<image>\nIs there a lesion?", "Yes, on the left.")},
        {
            "id": "chat",
            "image": "ct.png",
            "conversations": [
                *_turns("<image>\nIs there a lesion?", "Yes."),
                *_turns("Which side?", "The left side."),
            ],
        },
        {
            "id": "gen",
            "image": "ct.png",
            "target_image": "mri.png",
            "task": GENERATION,
            "conversations": _turns("<image>\nConvert this CT image into an MRI image.", "Here it is."),
        },
    ]
    (root / "train.json").write_text(json.dumps(records))
    return root


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _builder(hg: HealthGPT, cache: ImageCodeCache | None = None, **kw) -> SampleBuilder:
    args = dict(
        num_patches=hg.model.num_patches,
        image_vocab=hg.model.image_vocab,
        num_image_tokens=cache.num_tokens if cache else hg.config.vq.num_image_tokens,
        max_length=1024,
    )
    return SampleBuilder(hg.prompts, hg.template, **{**args, **kw})


@pytest.fixture(scope="module")
def cache(folder: Path, vqgan: VQGAN) -> ImageCodeCache:
    tokenize_images(folder / "train.json", vqgan, folder / "codes")
    return ImageCodeCache.open(folder / "codes")


def _dataset(hg: HealthGPT, folder: Path, cache: ImageCodeCache, **kw) -> TrainingDataset:
    specs, report = build_samples(
        load_records(folder / "train.json"), _builder(hg, cache, **kw), tasks=(COMPREHENSION, GENERATION), codes=cache
    )
    assert report.samples == 3 and not report.issues
    return TrainingDataset(specs, hg.preprocessor, hg.model.num_patches, hg.model.image_vocab, cache)


def test_prompt_ids_are_the_inference_ids_and_only_the_response_is_supervised(hg, folder, cache) -> None:
    item = _dataset(hg, folder, cache)[0]
    with Image.open(folder / "ct.png") as im:
        request = hg.build_request([{"role": "user", "content": "Is there a lesion?"}], [im.convert("RGB")])
    prompt = expand_image_slots(request.input_ids, hg.model.num_patches)
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    assert ids[: len(prompt)] == prompt
    assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert labels[len(prompt) :] == ids[len(prompt) :]
    assert hg.tokenizer.decode(ids[len(prompt) :]) == "Yes, on the left.<|end|>"
    assert torch.equal(item["pixel_values"], request.pixel_values) and item["plugin"] == COMPREHENSION


@pytest.mark.parametrize(
    ("index", "question"), [(0, "Is there a lesion?"), (2, "Convert this CT image into an MRI image.")]
)
def test_a_model_reading_images_after_the_text_trains_on_its_inference_prompt(folder, cache, index, question) -> None:
    """The records hold `<image>` first; a model with `images_after_text` (mini) trains with the patches after the
    question, exactly as `build_request` lays out its prompts, and the published layout is unchanged beside it."""
    after = HealthGPT.random(get_variant("nano").replace(images_after_text=True), seed=0)
    item = _dataset(after, folder, cache, images_after_text=True)[index]
    with Image.open(folder / "ct.png") as im:
        request = after.build_request(
            [{"role": "user", "content": question}],
            [im.convert("RGB")],
            plugin=item["plugin"],
            image_generation=index == 2,
        )
    prompt = expand_image_slots(request.input_ids, after.model.num_patches)
    assert item["input_ids"].tolist()[: len(prompt)] == prompt
    slot = list(request.input_ids).index(IMAGE_TOKEN_INDEX)
    assert after.tokenizer.decode(request.input_ids[:slot]).endswith(f"{question}\n")
    assert question not in after.tokenizer.decode(request.input_ids[slot + 1 :])
    published = _dataset(after, folder, cache)[index]["input_ids"].tolist()
    assert published != item["input_ids"].tolist() and sorted(published) == sorted(item["input_ids"].tolist())


def test_every_assistant_turn_of_a_multi_turn_chat_is_supervised(hg, folder, cache) -> None:
    item = _dataset(hg, folder, cache)[1]
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    spans, current = [], []
    for i, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(i)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [hg.tokenizer.decode(s) for s in spans] == ["Yes.<|end|>", "The left side.<|end|>"]
    second_prompt = hg.prompts.encode_prompt(
        hg.template.render(
            [
                {"role": "user", "content": "<image>\nIs there a lesion?"},
                {"role": "assistant", "content": "Yes."},
                {"role": "user", "content": "Which side?"},
            ]
        )
    )
    start = len(expand_image_slots(second_prompt, hg.model.num_patches))
    assert labels[start - 1] == IGNORE_INDEX and labels[start] == ids[start]


def test_generation_labels_are_the_code_token_ids(hg, folder, cache, vqgan) -> None:
    item = _dataset(hg, folder, cache)[2]
    vocab = hg.model.image_vocab
    with Image.open(folder / "mri.png") as im:
        codes = vqgan.encode(vqgan.preprocess([im.convert("RGB")]))[0].flatten()  # independent re-encoding
    with Image.open(folder / "ct.png") as im:
        request = hg.build_request(
            [{"role": "user", "content": "Convert this CT image into an MRI image."}],
            [im.convert("RGB")],
            plugin=GENERATION,
            image_generation=True,
        )
    prompt = expand_image_slots(request.input_ids, hg.model.num_patches)  # ends with <start_index>
    ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
    n = len(prompt)
    assert ids[:n] == prompt and labels[: n - 1] == [IGNORE_INDEX] * (n - 1)
    assert labels[n - 1] == vocab.start_id
    assert labels[n : n + len(codes)] == (codes + vocab.first_code_id).tolist()
    assert hg.tokenizer.decode(labels[n + len(codes) :]) == "<end_index><|end|>"
    assert item["plugin"] == GENERATION


def test_generation_twins_are_the_rows_guided_inference_conditions_on(hg, folder, cache) -> None:
    """With `twins`, a generation sample carries the unconditional row `image_request` builds for guidance (the same
    instruction without the image; for text to image, `UNCONDITIONAL_INSTRUCTION` without the report), with the same
    code labels; dataset index len + i reads it, and other samples have none."""
    found = load_records(folder / "train.json")
    tasks = (COMPREHENSION, GENERATION)
    specs, report = build_samples(found, _builder(hg, cache), tasks=tasks, codes=cache, twins=True)
    data = TrainingDataset(specs, hg.preprocessor, hg.model.num_patches, hg.model.image_vocab, cache)
    assert report.twins == 1 and data.has_twin.tolist() == [False, False, True]
    item, twin = data[2], data[len(data) + 2]
    with Image.open(folder / "ct.png") as im:
        built = image_request(hg, im.convert("RGB"), "Convert this CT image into an MRI image.", text=None, guided=True)
    assert built.unconditional is not None
    prompt = list(built.unconditional.input_ids)
    assert twin["input_ids"].tolist()[: len(prompt)] == prompt and IMAGE_TOKEN_INDEX not in prompt
    assert twin["pixel_values"] is None and item["pixel_values"] is not None and twin["plugin"] == GENERATION
    learned = [[label for label in x["labels"].tolist() if label != IGNORE_INDEX] for x in (item, twin)]
    assert learned[0] == learned[1] and len(learned[0]) > hg.config.vq.num_image_tokens
    with pytest.raises(IndexError, match="sample 0 has no unconditional twin"):
        data[len(data)]

    report_record = replace(found.records[2], images=(), turns=(("user", "Cardiomegaly."), found.records[2].turns[1]))
    chest_twin = unconditional_twin(report_record)
    assert chest_twin is not None and chest_twin.turns[0] == ("user", UNCONDITIONAL_INSTRUCTION)
    spec = _builder(hg, cache).build(chest_twin, cache)
    unconditional = image_request(hg, None, "report_to_cxr", text="Cardiomegaly.", guided=True).unconditional
    assert spec is not None and unconditional is not None
    assert spec.ids.tolist()[: len(unconditional.input_ids)] == list(unconditional.input_ids)
    assert unconditional_twin(found.records[0]) is None and unconditional_twin(found.records[1]) is None


@pytest.mark.parametrize("layout", ["before", "after"])
def test_generation_reply_text_layouts(hg, folder, cache, layout) -> None:
    item = _dataset(hg, folder, cache, generation_text=layout)[2]
    supervised = [i for i in item["labels"].tolist() if i != IGNORE_INDEX]
    vocab = hg.model.image_vocab
    text = hg.tokenizer.decode([i for i in supervised if not vocab.is_code(torch.tensor(i))])
    expected = {
        "before": "Here it is.<start_index><end_index><|end|>",
        "after": "<start_index><end_index>Here it is.<|end|>",
    }
    assert text == expected[layout]


def test_overlong_samples_are_truncated_or_dropped_and_counted(hg, folder, cache) -> None:
    found = load_records(folder / "train.json")
    full = _dataset(hg, folder, cache)
    both = (COMPREHENSION, GENERATION)
    limit = len(full[0]["input_ids"]) - 3  # cuts the first answer; the other samples are longer still
    specs, report = build_samples(
        found, _builder(hg, cache, max_length=limit, overlong="drop"), tasks=both, codes=cache
    )
    assert (report.dropped_overlong, report.samples) == (3, 0)
    specs, report = build_samples(found, _builder(hg, cache, max_length=limit), tasks=(COMPREHENSION,), codes=cache)
    assert (report.truncated, report.dropped_overlong, report.other_task) == (2, 0, 1)
    ds = TrainingDataset(specs, hg.preprocessor, hg.model.num_patches, hg.model.image_vocab, cache)
    for i in range(2):
        assert torch.equal(ds[i]["input_ids"], full[i]["input_ids"][:limit])
        assert torch.equal(ds[i]["labels"], full[i]["labels"][:limit])
    # A generation target cut after 5 codes keeps those codes.
    limit = int((full[2]["labels"] == IGNORE_INDEX).sum()) + 6
    specs, report = build_samples(found, _builder(hg, cache, max_length=limit), tasks=(GENERATION,), codes=cache)
    item = TrainingDataset(specs, hg.preprocessor, hg.model.num_patches, hg.model.image_vocab, cache)[0]
    assert report.truncated == 1 and torch.equal(item["labels"], full[2]["labels"][:limit])
    # A limit inside the image slots, or before any response token, cannot be met: such samples are dropped.
    for limit in (20, len(full[2]["input_ids"]) - 70):
        specs, report = build_samples(found, _builder(hg, cache, max_length=limit), tasks=both, codes=cache)
        assert report.dropped_overlong == 3 - report.samples and all(len(s.ids) <= limit for s in specs)
    assert report.dropped_overlong >= 1


def test_missing_codes_are_reported_or_raised(hg, folder, tmp_path, vqgan) -> None:
    empty = ImageCodeCache.for_vqgan(tmp_path / "codes", vqgan)
    found = load_records(folder / "train.json")
    specs, report = build_samples(found, _builder(hg, empty), tasks=(GENERATION,), codes=empty)
    assert not specs and "train.json:1 (record 2, id 'gen'): target image" in str(report.issues[0])
    with pytest.raises(DataError, match="has no cached codes; run tokenize_images"):
        build_samples(found, _builder(hg, empty), tasks=(GENERATION,), codes=empty, on_error="raise")


def test_code_cache_is_resumable_and_tied_to_its_vqgan(hg, folder, vqgan, tmp_path) -> None:
    data = folder / "train.json"
    vqgan.save(tmp_path / "vqgan")
    first = tokenize_images(data, tmp_path / "vqgan", tmp_path / "codes")  # a saved folder; then the model itself
    assert (first.encoded, first.already_cached) == (1, 0)
    cache = ImageCodeCache.open(tmp_path / "codes")
    stored = cache.load(folder / "mri.png")
    assert (tokenize_images(data, vqgan, tmp_path / "codes").encoded, cache.has(folder / "mri.png")) == (0, True)
    cache.path(folder / "mri.png").unlink()
    assert tokenize_images(data, vqgan, tmp_path / "codes").encoded == 1
    assert np.array_equal(cache.load(folder / "mri.png"), stored)
    other = VQGAN.from_config(hg.config.vq)
    with pytest.raises(CodeCacheError, match="holds codes of another VQGAN"):
        tokenize_images(data, other, tmp_path / "codes")


def test_collate_pads_right_and_stacks_images(hg, folder, cache) -> None:
    ds = _dataset(hg, folder, cache)
    items = [ds[2], ds[0]]
    batch = collate(items, pad_id=hg.pad_id)
    n0, n1 = len(items[0]["input_ids"]), len(items[1]["input_ids"])
    assert batch["input_ids"].shape == (2, max(n0, n1)) and n0 > n1
    assert batch["input_ids"][1, n1:].eq(hg.pad_id).all() and batch["labels"][1, n1:].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(dim=1).tolist() == [n0, n1]
    assert torch.equal(batch["pixel_values"], torch.cat([items[0]["pixel_values"], items[1]["pixel_values"]]))
    assert batch["plugins"] == [GENERATION, COMPREHENSION]
    assert (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 2 * hg.model.num_patches


def test_loss_is_the_mean_cross_entropy_over_supervised_tokens(hg, folder, cache) -> None:
    ds = _dataset(hg, folder, cache)
    batch = collate([ds[0], ds[1], ds[2]], pad_id=hg.pad_id)
    model = hg.model
    with torch.no_grad():
        args = (batch["input_ids"], batch["plugins"], batch["pixel_values"], batch["attention_mask"])
        loss = model(*args, labels=batch["labels"]).loss
        logits = model(*args).logits.float()
        summed = model(*args, labels=batch["labels"], num_items_in_batch=7).loss
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[mask]
    assert mask.sum() == num_supervised(batch["labels"])
    torch.testing.assert_close(loss, nll.mean())
    torch.testing.assert_close(summed, nll.sum() / 7)


def test_training_and_evaluation_read_images_as_inference_does(hg, tmp_path, vqgan) -> None:
    """A DICOM (HU, own window) and a 16-bit PNG (percentile window) become the pictures `load_image` gives."""
    from pydicom.data import get_testdata_file

    from healthgpt.evaluation.items import EvalItem
    from healthgpt.io import load_image

    ct = Path(get_testdata_file("CT_small.dcm"))
    deep = np.random.default_rng(1).integers(0, 4000, (32, 32), dtype=np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    records = [
        {"id": "ct", "image": str(ct), "conversations": _turns("<image>\nIs there a lesion?", "No.")},
        {"id": "deep", "image": "deep.png", "conversations": _turns("<image>\nIs there a lesion?", "Yes.")},
        {
            "id": "gen",
            "image": "deep.png",
            "target_image": str(ct),
            "task": GENERATION,
            "conversations": _turns("<image>\nConvert this image.", "Here it is."),
        },
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    tokenize_images(tmp_path / "train.json", vqgan, tmp_path / "codes")
    cache = ImageCodeCache.open(tmp_path / "codes")
    specs, report = build_samples(
        load_records(tmp_path / "train.json"), _builder(hg, cache), tasks=(COMPREHENSION, GENERATION), codes=cache
    )
    assert report.samples == 3 and not report.issues
    dataset = TrainingDataset(specs, hg.preprocessor, hg.model.num_patches, hg.model.image_vocab, cache)
    pictures = {path: load_image(path).to_pil() for path in (ct, tmp_path / "deep.png")}
    for index, path in ((0, ct), (1, tmp_path / "deep.png")):
        assert torch.equal(dataset[index]["pixel_values"], hg.preprocessor([pictures[path]]))
    with torch.inference_mode():
        expected = vqgan.encode(vqgan.preprocess([pictures[ct]])).numpy()[0].ravel()
    assert np.array_equal(cache.load(ct), expected)  # the target's codes come from the same picture
    item = EvalItem(id="q", dataset="vqa-rad", images=(ct,), question="?", answer="no", kind="closed")
    assert np.array_equal(np.asarray(item.load_images()[0]), np.asarray(pictures[ct]))
