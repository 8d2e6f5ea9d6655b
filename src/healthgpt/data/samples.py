"""Records -> supervised token sequences: prompt ids as at inference, labels on every response, VQ codes as targets.

Prompt and responses are rendered with the model's chat template and tokenized as one string with the published
chunk-wise rule (`PromptTokenizer.encode_prompt`), so the prompt part of every turn has exactly the ids the model
sees at inference. Labels are -100 on the system prompt, user turns, role tags and image slots; every assistant
turn (its text and closing separator) is supervised. A generation response is `<start_index>`, the target's code
ids (by arithmetic, `ImageVocab.codes_to_ids`) and `<end_index>`, with the record's reply text dropped (the
published inference layout: the prompt ends with `<start_index>`), or placed before or after the image span. A
generation sample may carry its classifier-free-guidance twin (`unconditional_twin`), learned in its place now and then.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from healthgpt.config import GENERATION
from healthgpt.data.image_codes import ImageCodeCache
from healthgpt.data.records import DataError, DataIssue, OnError, Origin, Record, RecordSet
from healthgpt.io import ImageInputError, load_image
from healthgpt.tasks import UNCONDITIONAL_INSTRUCTION
from healthgpt.templates import ChatTemplate, place_images
from healthgpt.tokens import (
    END_IMAGE,
    IGNORE_INDEX,
    IMAGE_PLACEHOLDER,
    IMAGE_TOKEN_INDEX,
    START_IMAGE,
    ImageVocab,
    PromptTokenizer,
)
from healthgpt.vision import ImagePreprocessor

log = logging.getLogger(__name__)

CODE_SPAN = -300  # stored once per generation sample; expands to the target's code ids in ids and labels
Overlong = Literal["drop", "truncate"]
GenerationText = Literal["drop", "before", "after"]


@dataclass(frozen=True)
class SampleSpec:
    """A tokenized sample before images and codes are loaded: ids and labels with the image (-200) and code-span
    (-300) sentinels unexpanded, and the final (expanded, possibly truncated) length."""

    ids: np.ndarray
    labels: np.ndarray
    images: tuple[Path, ...]
    plugin: str
    length: int
    origin: Origin
    target_image: Path | None = None
    target_codes: tuple[int, ...] | None = None
    twin: SampleSpec | None = None  # the unconditional twin of a generation sample (`unconditional_twin`)


@dataclass
class DataReport:
    """Counts of what became of the records: kept, skipped as malformed, dropped or truncated for length."""

    samples: int = 0
    by_task: dict[str, int] = field(default_factory=dict)
    other_task: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    twins: int = 0
    issues: list[DataIssue] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "by_task": self.by_task,
            "records_of_other_tasks": self.other_task,
            "overlong_truncated": self.truncated,
            "overlong_dropped": self.dropped_overlong,
            "unconditional_twins": self.twins,
            "malformed_skipped": len(self.issues),
            "malformed": [str(i) for i in self.issues[:100]],
        }


def unconditional_twin(record: Record) -> Record | None:
    """What guided inference conditions its second row on (`healthgpt.api.images.image_request`), as a record: a
    one-turn generation record's instruction and target without its images, or `UNCONDITIONAL_INSTRUCTION` in place
    of a text-to-image record's text (the report); None for any other record."""
    if record.task != GENERATION or len(record.turns) != 2:
        return None
    (role, text), reply = record.turns
    words = text.replace(IMAGE_PLACEHOLDER, "").strip() if record.images else UNCONDITIONAL_INSTRUCTION
    return replace(record, turns=((role, words), reply), images=())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class SampleBuilder:
    """Tokenizes checked records for one model: template, prompt tokenizer, image slots, code vocabulary, context."""

    def __init__(
        self,
        prompts: PromptTokenizer,
        template: ChatTemplate,
        *,
        num_patches: int,
        image_vocab: ImageVocab | None,
        num_image_tokens: int,
        max_length: int,
        overlong: Overlong = "truncate",
        system: str | None = None,
        generation_text: GenerationText = "drop",
        images_after_text: bool = False,
    ) -> None:
        if overlong not in ("drop", "truncate"):
            raise ValueError(f"overlong must be 'drop' or 'truncate', got {overlong!r}")
        if generation_text not in ("drop", "before", "after"):
            raise ValueError(f"generation_text must be 'drop', 'before' or 'after', got {generation_text!r}")
        self.prompts = prompts
        self.template = template
        self.num_patches = num_patches
        self.image_vocab = image_vocab
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.overlong = overlong
        self.system = system
        self.generation_text = generation_text
        self.images_after_text = images_after_text

    def _messages(self, record: Record) -> list[dict[str, str]]:
        messages = [
            {"role": role, "content": self._user_turn(text) if role == "user" else text} for role, text in record.turns
        ]
        if record.task == GENERATION:
            text = messages[-1]["content"].strip()
            span = START_IMAGE + END_IMAGE
            layout = {"drop": span, "before": text + span, "after": span + text}
            messages[-1]["content"] = layout[self.generation_text if text else "drop"]
        return messages

    def _user_turn(self, text: str) -> str:
        """A user turn with its images where the model reads them (records hold them first, LLaVA's rule)."""
        count = text.count(IMAGE_PLACEHOLDER)
        rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
        return place_images(rest, count, self.images_after_text) if count else text

    def tokenize(self, record: Record) -> tuple[list[int], list[int]]:
        """(ids, labels) with one IMAGE_TOKEN_INDEX per image and one CODE_SPAN per generation target."""
        messages = self._messages(record)
        encode = self.prompts.encode_prompt
        render = self.template.render
        full = encode(render(messages, system=self.system, add_generation_prompt=False))
        labels = [IGNORE_INDEX] * len(full)
        for k in range(1, len(messages), 2):
            # The prompt before turn k is exactly what inference would feed; the turn and its separator are learned.
            start = _common_prefix(encode(render(messages[:k], system=self.system)), full)
            end = (
                len(full)
                if k == len(messages) - 1
                else _common_prefix(
                    encode(render(messages[: k + 1], system=self.system, add_generation_prompt=False)), full
                )
            )
            labels[start:end] = full[start:end]
        if record.task == GENERATION:
            vocab = self.image_vocab
            if vocab is None:
                raise DataError("this model has no image-token vocabulary, so it cannot learn generation records")
            at = next(
                i for i in range(len(full) - 1, 0, -1) if full[i - 1] == vocab.start_id and full[i] == vocab.end_id
            )
            full.insert(at, CODE_SPAN)
            labels.insert(at, CODE_SPAN)
        labels = [IGNORE_INDEX if i == IMAGE_TOKEN_INDEX else label for i, label in zip(full, labels, strict=True)]
        return full, labels

    def expanded_length(self, ids: Sequence[int]) -> int:
        extra = {IMAGE_TOKEN_INDEX: self.num_patches - 1, CODE_SPAN: self.num_image_tokens - 1}
        return len(ids) + sum(extra.get(i, 0) for i in ids)

    def _truncation_ok(self, ids: Sequence[int], labels: Sequence[int]) -> bool:
        """Truncating to max_length cuts no image-slot span and keeps at least one supervised target."""
        pos, supervised = 0, False
        for i, label in zip(ids, labels, strict=True):
            width = self.num_patches if i == IMAGE_TOKEN_INDEX else self.num_image_tokens if i == CODE_SPAN else 1
            if pos >= self.max_length:
                break
            if i == IMAGE_TOKEN_INDEX and pos + width > self.max_length:
                return False
            supervised |= label != IGNORE_INDEX and pos >= 1
            pos += width
        return supervised

    def build(self, record: Record, codes: ImageCodeCache | None) -> SampleSpec | None:
        """The sample of `record`, or None when it is too long and `overlong="drop"` (or truncation would cut an
        image or leave nothing to learn). Raises `DataError` for what makes the record unusable."""
        target_codes = record.target_codes
        if record.task == GENERATION:
            if target_codes is not None:
                vocab = self.image_vocab
                limit = vocab.num_codes if vocab is not None else 0
                if len(target_codes) != self.num_image_tokens or min(target_codes) < 0 or max(target_codes) >= limit:
                    raise DataError(
                        f"'target_codes' must be {self.num_image_tokens} codes in [0, {limit}), got "
                        f"{len(target_codes)} codes in [{min(target_codes)}, {max(target_codes)}]"
                    )
            elif codes is None:
                raise DataError("generation record but no image-code cache given (run tokenize_images first)")
            elif not codes.has(record.target_image):  # type: ignore[arg-type]
                raise DataError(f"target image {record.target_image} has no cached codes; run tokenize_images")
        ids, labels = self.tokenize(record)
        length = self.expanded_length(ids)
        if length > self.max_length:
            if self.overlong == "drop" or not self._truncation_ok(ids, labels):
                return None
            length = self.max_length
        return SampleSpec(
            np.asarray(ids, dtype=np.int32),
            np.asarray(labels, dtype=np.int32),
            record.images,
            record.task,
            length,
            record.origin,
            record.target_image,
            target_codes,
        )


class TrainingDataset(Dataset):
    """Samples with images and codes loaded on access: each item is a dict of `input_ids`, `labels` (LongTensor [T]),
    `pixel_values` ([n, 3, S, S] or None) and `plugin`. Index `len(self) + i` reads sample i's unconditional twin."""

    def __init__(
        self,
        specs: Sequence[SampleSpec],
        preprocessor: ImagePreprocessor,
        num_patches: int,
        image_vocab: ImageVocab | None,
        codes: ImageCodeCache | None = None,
    ) -> None:
        self.specs = list(specs)
        self.preprocessor = preprocessor
        self.num_patches = num_patches
        self.image_vocab = image_vocab
        self.codes = codes

    def __len__(self) -> int:
        return len(self.specs)

    def _target_ids(self, spec: SampleSpec) -> np.ndarray:
        if spec.target_codes is not None:
            codes = np.asarray(spec.target_codes, dtype=np.int64)
        else:
            assert self.codes is not None and spec.target_image is not None  # checked by SampleBuilder.build
            codes = self.codes.load(spec.target_image)
        assert self.image_vocab is not None
        return self.image_vocab.codes_to_ids(torch.from_numpy(codes)).numpy()

    @property
    def has_twin(self) -> np.ndarray:
        """Whether each sample has an unconditional twin to be read in its place."""
        return np.array([spec.twin is not None for spec in self.specs], dtype=bool)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.specs)
        spec = self.specs[index] if index < n else self.specs[index - n].twin
        if spec is None:
            raise IndexError(f"sample {index - n} has no unconditional twin")
        ids: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        for i, label in zip(spec.ids.tolist(), spec.labels.tolist(), strict=True):
            if i == IMAGE_TOKEN_INDEX:
                ids.append(np.full(self.num_patches, IMAGE_TOKEN_INDEX))
                labels.append(np.full(self.num_patches, IGNORE_INDEX))
            elif i == CODE_SPAN:
                target = self._target_ids(spec)
                ids.append(target)
                labels.append(target)
            else:
                ids.append(np.array([i]))
                labels.append(np.array([label]))
        input_ids = torch.from_numpy(np.concatenate(ids)[: spec.length].astype(np.int64))
        target = torch.from_numpy(np.concatenate(labels)[: spec.length].astype(np.int64))
        pixels = None
        if spec.images:
            try:  # as at inference: DICOM in HU with its window, 16-bit grey by percentiles
                loaded = [load_image(path).to_pil() for path in spec.images]
            except ImageInputError as e:
                raise DataError(f"{spec.origin}: cannot read image: {e}") from e
            pixels = self.preprocessor(loaded)
        return {"input_ids": input_ids, "labels": target, "pixel_values": pixels, "plugin": spec.plugin}


def build_samples(
    found: RecordSet,
    builder: SampleBuilder,
    *,
    tasks: Collection[str],
    codes: ImageCodeCache | None = None,
    on_error: OnError = "skip",
    twins: bool = False,
) -> tuple[list[SampleSpec], DataReport]:
    """Tokenize the records of `tasks`; malformed ones are skipped and reported (or raised), overlong ones dropped
    or truncated by the builder's rule and counted. With `twins`, each generation sample carries its
    `unconditional_twin`'s sample too (for `StageConfig.condition_dropout`)."""
    report = DataReport(issues=list(found.issues))
    specs: list[SampleSpec] = []
    for record in found.records:
        if record.task not in tasks:
            report.other_task += 1
            continue
        try:
            spec = builder.build(record, codes)
        except DataError as e:
            issue = DataIssue(record.origin, str(e))
            if on_error == "raise":
                raise DataError(str(issue)) from None
            log.warning("skipping %s", issue)
            report.issues.append(issue)
            continue
        if spec is None:
            report.dropped_overlong += 1
            continue
        if builder.expanded_length(spec.ids.tolist()) > spec.length:
            report.truncated += 1
        twin = unconditional_twin(record) if twins else None
        if twin is not None:
            spec = replace(spec, twin=builder.build(twin, codes))
            report.twins += spec.twin is not None
        specs.append(spec)
        report.by_task[spec.plugin] = report.by_task.get(spec.plugin, 0) + 1
    report.samples = len(specs)
    if report.dropped_overlong or report.truncated:
        log.warning(
            "%d sample(s) longer than %d tokens: %d truncated, %d dropped",
            report.dropped_overlong + report.truncated,
            builder.max_length,
            report.truncated,
            report.dropped_overlong,
        )
    return specs, report
