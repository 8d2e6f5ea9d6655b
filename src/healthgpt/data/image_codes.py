"""VQ codes of generation target images, encoded once and cached on disk (one `.npy` per image).

The cache folder holds `manifest.json` (code count, grid and a fingerprint of the VQGAN weights, so codes from
another tokenizer are never mixed in) and `codes/<aa>/<sha1 of the image's absolute path>.npy`, each written
atomically. `tokenize_images` skips images already cached, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from healthgpt.checkpoints import load_vqgan
from healthgpt.config import GENERATION
from healthgpt.data.records import DataIssue, OnError, Origin, Source, load_records
from healthgpt.errors import HealthGPTError
from healthgpt.io import ImageInputError, load_image
from healthgpt.io.atomic import atomic_target
from healthgpt.vqgan import VQGAN

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CodeCacheError(HealthGPTError):
    """The code cache does not fit (another VQGAN, wrong code count) or lacks an image's codes."""


def vqgan_fingerprint(vqgan: VQGAN) -> str:
    """SHA-256 over the VQGAN's architecture and weights: the identity of the codes it produces."""
    digest = hashlib.sha256(json.dumps(vqgan.arch, sort_keys=True).encode())
    for key, tensor in sorted(vqgan.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class ImageCodeCache:
    """Read and write cached codes of images, keyed by the image's absolute path."""

    def __init__(self, root: str | os.PathLike[str], manifest: Mapping[str, object]) -> None:
        self.root = Path(root)
        self.num_codes = int(manifest["num_codes"])  # type: ignore[arg-type]
        self.grid = int(manifest["grid"])  # type: ignore[arg-type]
        self.fingerprint = str(manifest["vqgan"])

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> ImageCodeCache:
        """An existing cache (written by `tokenize_images`)."""
        path = Path(root) / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CodeCacheError(f"{root}: not an image-code cache ({e}); create it with tokenize_images") from e
        if manifest.get("format") != FORMAT_VERSION:
            raise CodeCacheError(f"{path}: cache format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
        return cls(root, manifest)

    @classmethod
    def for_vqgan(cls, root: str | os.PathLike[str], vqgan: VQGAN) -> ImageCodeCache:
        """Open the cache at `root`, creating it for `vqgan`; refuses a cache written by another VQGAN."""
        manifest = {"format": FORMAT_VERSION, "num_codes": vqgan.num_codes, "grid": vqgan.grid}
        manifest["vqgan"] = vqgan_fingerprint(vqgan)
        root = Path(root)
        if (root / MANIFEST).exists():
            cache = cls.open(root)
            if (cache.num_codes, cache.grid, cache.fingerprint) != (vqgan.num_codes, vqgan.grid, manifest["vqgan"]):
                raise CodeCacheError(
                    f"{root} holds codes of another VQGAN ({cache.num_codes} codes, grid {cache.grid}, weights "
                    f"{cache.fingerprint[:12]}); use a new cache folder for this one"
                )
            return cache
        root.mkdir(parents=True, exist_ok=True)
        with atomic_target(root / MANIFEST) as tmp:
            tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        return cls(root, manifest)

    @property
    def num_tokens(self) -> int:
        """Codes per image (grid x grid)."""
        return self.grid * self.grid

    def path(self, image: str | os.PathLike[str]) -> Path:
        digest = hashlib.sha1(os.path.abspath(image).encode()).hexdigest()
        return self.root / "codes" / digest[:2] / f"{digest}.npy"

    def has(self, image: str | os.PathLike[str]) -> bool:
        return self.path(image).is_file()

    def load(self, image: str | os.PathLike[str]) -> np.ndarray:
        """The image's codes in raster order, int64 [grid * grid]."""
        path = self.path(image)
        if not path.is_file():
            raise CodeCacheError(f"no cached codes for {image} in {self.root}; run tokenize_images on its data first")
        codes = np.load(path).astype(np.int64).reshape(-1)
        if codes.size != self.num_tokens:
            raise CodeCacheError(f"{path}: {codes.size} codes, expected {self.num_tokens}")
        return codes

    def save(self, image: str | os.PathLike[str], codes: np.ndarray) -> None:
        path = self.path(image)
        path.parent.mkdir(parents=True, exist_ok=True)
        dtype = np.uint16 if self.num_codes <= np.iinfo(np.uint16).max + 1 else np.int32
        with atomic_target(path) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(codes).astype(dtype).reshape(self.grid, self.grid))


@dataclass
class TokenizeReport:
    """What one `tokenize_images` run did."""

    encoded: int = 0
    already_cached: int = 0
    issues: list[DataIssue] = field(default_factory=list)


def tokenize_images(
    sources: Source | Sequence[str | os.PathLike[str]],
    vqgan: VQGAN | str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    image_folder: str | os.PathLike[str] | None = None,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    on_error: OnError = "skip",
    field_map: Mapping[str, str] | None = None,
) -> TokenizeReport:
    """Encode the target image of every generation record in `sources` with `vqgan` (a model, a folder saved by
    `VQGAN.save`, or taming's `last.ckpt` / its folder) into the cache at `cache_dir`; images already cached are
    skipped. Returns counts and issues."""
    model = (load_vqgan(vqgan) if isinstance(vqgan, (str, os.PathLike)) else vqgan).to(device).eval()
    cache = ImageCodeCache.for_vqgan(cache_dir, model)
    found = load_records(sources, image_folder=image_folder, on_error=on_error, field_map=field_map)
    report = TokenizeReport(issues=list(found.issues))
    targets: dict[Path, Origin] = {}
    for record in found.records:
        if record.task == GENERATION and record.target_image is not None:
            targets.setdefault(record.target_image, record.origin)
    pending = [p for p in targets if not cache.has(p)]
    report.already_cached = len(targets) - len(pending)
    bar = tqdm(total=len(pending), desc="tokenize images", unit="img", disable=not pending)
    for start in range(0, len(pending), batch_size):
        batch, images = [], []
        for path in pending[start : start + batch_size]:
            try:
                images.append(load_image(path).to_pil())  # read as at inference (DICOM windows, 16-bit grey)
                batch.append(path)
            except ImageInputError as e:
                issue = DataIssue(targets[path], f"cannot read target image {path}: {e}")
                if on_error == "raise":
                    raise CodeCacheError(str(issue)) from e
                log.warning("skipping %s", issue)
                report.issues.append(issue)
        if batch:
            codes = model.encode(model.preprocess(images).to(device)).cpu().numpy()  # [b, grid, grid]
            for path, c in zip(batch, codes, strict=True):
                cache.save(path, c)
            report.encoded += len(batch)
        bar.update(len(pending[start : start + batch_size]))
    bar.close()
    log.info(
        "tokenize_images: %d encoded, %d already cached, %d issue(s)",
        report.encoded,
        report.already_cached,
        len(report.issues),
    )
    return report
