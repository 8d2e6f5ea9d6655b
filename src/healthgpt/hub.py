"""Finding the files of an official HealthGPT variant: explicit paths first, then a local folder in the official
layout, then the Hugging Face Hub (`lintw/HealthGPT-*` for the H-LoRA files, the upstream ids for the base LLM and
CLIP). Whatever cannot be found is reported in one error that says which file to place where."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

from .config import HealthGPTConfig

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
# What a transformers folder needs: config, weights, tokenizer files (SentencePiece model, BPE vocab and merges).
LLM_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "*.txt", "*.tiktoken")
CLIP_PATTERNS = ("*.json", "*.safetensors", "*.txt")


class WeightsNotFoundError(FileNotFoundError):
    """One or more files of a model could not be found locally nor downloaded; the message lists each with where
    to place it."""


@dataclass(frozen=True)
class OfficialFiles:
    """Local paths of everything an official variant is loaded from."""

    base_model: Path
    vision_tower: Path
    plugin_files: dict[str, Path]
    fusion_file: Path | None


def variant_of_hub_id(repo_id: str, variants: Mapping[str, HealthGPTConfig]) -> HealthGPTConfig | None:
    """The variant published under `repo_id` (case-insensitive), if any."""
    return next((v for v in variants.values() if v.hub_id and v.hub_id.lower() == repo_id.lower()), None)


def is_repo_id(value: str | Path) -> bool:
    """Whether `value` has the form of a Hub id (`owner/name`) and is not an existing local path."""
    return isinstance(value, str) and bool(_REPO_ID.match(value)) and not Path(value).exists()


def _folder(value: str | Path, patterns: Sequence[str], cache_dir: str | Path | None, revision: str | None) -> Path:
    """A local transformers folder, or a Hub snapshot of one (weights: safetensors, else `pytorch_model.bin`)."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if not is_repo_id(value):
        raise FileNotFoundError(f"{value}: no such folder")
    kw = dict(cache_dir=cache_dir, revision=revision)
    folder = Path(snapshot_download(str(value), allow_patterns=list(patterns), **kw))
    if not any(folder.glob("*.safetensors")):
        hf_hub_download(str(value), "pytorch_model.bin", **kw)  # older repos ship only the pickle (weights_only load)
    return folder


def _hub_file(repo_id: str | None, name: str, cache_dir: str | Path | None, revision: str | None) -> Path:
    if repo_id is None:
        raise FileNotFoundError(f"{name}: not given and the variant has no Hub repository")
    return Path(hf_hub_download(repo_id, name, cache_dir=cache_dir, revision=revision))


class _Lookup:
    """The search for one variant's files: each failed attempt is kept, so that one error can list them all."""

    def __init__(
        self, config: HealthGPTConfig, folder: str | Path | None, cache_dir: str | Path | None, revision: str | None
    ) -> None:
        self.config, self.folder, self.cache_dir, self.revision = config, folder, cache_dir, revision
        self.source = f"https://huggingface.co/{config.hub_id}" if config.hub_id else "the HealthGPT release"
        self.problems: list[str] = []

    def attempt(self, what: str, how: str, fetch: Callable[[], Path]) -> Path | None:
        """`fetch()`, or None with the failure noted as `what`: `how` to provide it (and the error)."""
        try:
            return fetch()
        except (OSError, EntryNotFoundError, HfHubHTTPError) as e:  # offline, not cached, not found, HTTP errors
            self.problems.append(
                f"  {what}: {how}\n      ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            )
            return None

    def official(self, name: str, given: str | Path | None) -> Path:
        """A released file: the `given` path, else `folder/<name>`, else the variant's Hub repository."""
        if given is not None:
            path = Path(given).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such file")
            return path
        if self.folder is not None and (Path(self.folder) / name).is_file():
            return Path(self.folder) / name
        return _hub_file(self.config.hub_id, name, self.cache_dir, self.revision)

    def plugin_files(self, plugins: Sequence[str], given: Mapping[str, str | Path]) -> dict[str, Path]:
        """Each plugin's H-LoRA file that can be found (`given`, else the released one)."""
        files: dict[str, Path] = {}
        for plugin in plugins:
            name = self.config.official_files.get(plugin)
            if name is None and plugin not in given:
                self.problems.append(
                    f"  plugin_files[{plugin!r}]: {self.config.name} has no released file for this plugin"
                )
                continue
            path = self.attempt(
                f"plugin_files[{plugin!r}]",
                f"{name} from {self.source}, in the source folder or given as plugin_files={{{plugin!r}: path}}",
                lambda n=name, p=plugin: self.official(n, given.get(p)),
            )
            if path is not None:
                files[plugin] = path
        return files

    def fusion_file(self, given: str | Path | None) -> Path | None:
        """The fusion file (`given`, else the released one), if it can be found."""
        name = self.config.official_files.get("fusion", "fusion_layer_weights.bin")
        return self.attempt(
            "fusion_file",
            f"{name} from {self.source}, in the source folder or given as fusion_file= (or load with fusion='none')",
            lambda: self.official(name, given),
        )

    def raise_if_missing(self) -> None:
        """One `WeightsNotFoundError` listing every file not found, with where to place it."""
        if self.problems:
            raise WeightsNotFoundError(
                f"cannot find the files of HealthGPT {self.config.name} locally or on the Hub (offline, not cached, "
                "or no network). Place them and pass their paths:\n" + "\n".join(self.problems)
            )


def resolve_official_files(
    config: HealthGPTConfig,
    plugins: Sequence[str],
    *,
    need_fusion: bool,
    base_model: str | Path | None = None,
    vision_tower: str | Path | None = None,
    plugin_files: Mapping[str, str | Path] | None = None,
    fusion_file: str | Path | None = None,
    folder: str | Path | None = None,
    cache_dir: str | Path | None = None,
    revision: str | None = None,
) -> OfficialFiles:
    """Local paths for the base LLM, CLIP, each plugin's H-LoRA file and (if `need_fusion`) the fusion file.

    Each comes from its argument, else `folder/<official file name>`, else the Hub (the variant's `hub_id` for the
    H-LoRA files, `config.llm.source` / `config.vision.source` for the base models); `revision` applies to the
    variant's repository. Raises `WeightsNotFoundError` listing every file that is missing, with where to put it.
    """
    lookup = _Lookup(config, folder, cache_dir, revision)
    base = lookup.attempt(
        "base_model",
        f"a local folder of {config.llm.source} (config.json, *.safetensors, tokenizer files); pass base_model=",
        lambda: _folder(base_model or config.llm.source, LLM_PATTERNS, cache_dir, None),
    )
    vision = lookup.attempt(
        "vision_tower",
        f"a local folder of {config.vision.source} (config.json, weights, preprocessor_config.json); "
        "pass vision_tower=",
        lambda: _folder(vision_tower or config.vision.source, CLIP_PATTERNS, cache_dir, None),
    )
    files = lookup.plugin_files(plugins, dict(plugin_files or {}))
    fusion = lookup.fusion_file(fusion_file) if need_fusion else None
    lookup.raise_if_missing()
    assert base is not None and vision is not None
    return OfficialFiles(base, vision, files, fusion)
