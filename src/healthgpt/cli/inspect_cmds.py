"""`convert` (official files to a bundle) and `info` (what a checkpoint or an image file holds)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

if TYPE_CHECKING:
    from ..config import HealthGPTConfig
    from ..io import MedicalImage

from .. import jsonout
from .common import WEIGHT_SUFFIXES, ModelOptions, Overwrite, command
from .outputs import check_output_folder, output_path


# ----- convert, info, demo -----------------------------------------------------------------------------------------
@command
def convert(
    output: Annotated[Path, typer.Argument(help="New folder to write the bundle into.", show_default=False)],
    include_base: Annotated[
        bool,
        typer.Option(
            "--include-base/--refer-to-base",
            help="Copy the base LLM and CLIP tower into the bundle, or refer to their local folders.",
        ),
    ] = False,
    overwrite: Overwrite = False,
    *,
    model: ModelOptions,
) -> None:
    """Turn official HealthGPT files into one bundle folder that `--model BUNDLE` loads.

    --model names the official files (a folder of them, a variant or a Hub id), with --base-model, --vision-tower,
    --plugin-file, --fusion-file and --vqgan where they are elsewhere."""
    check_output_folder(output, overwrite=overwrite, inputs=model.local_files())  # before any weight is read
    with output_path(output, overwrite=overwrite) as target:
        model.convert(target, include_base=include_base)
    typer.echo(str(output))


_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64"}


def _human(value: float, units: Sequence[str], step: float) -> str:
    for unit in units[:-1]:
        if abs(value) < step:
            return f"{value:.4g} {unit}".strip()
        value /= step
    return f"{value:.4g} {units[-1]}"


def _tensor_shapes(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """{name: (shape, dtype)} of a weight file, read without loading the values where the format allows."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(path, framework="numpy") as file:
            slices = {key: file.get_slice(key) for key in file.keys()}
            return {
                k: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype(), s.get_dtype().lower()))
                for k, s in slices.items()
            }
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    found: dict[str, tuple[tuple[int, ...], str]] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix.rstrip(".")] = (tuple(value.shape), str(value.dtype).removeprefix("torch."))
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{prefix}{key}.")

    walk(state, "")
    return found


def _weights_info(path: Path, root: Path) -> dict[str, Any]:
    """Size, tensor and parameter counts and dtypes of one weight file; rank and experts of H-LoRA tensors."""
    facts: dict[str, Any] = {"file": str(path.relative_to(root)) if path != root else path.name}
    facts["size"] = _human(path.stat().st_size, ("B", "KB", "MB", "GB", "TB"), 1024)
    try:
        shapes = _tensor_shapes(path)
    except Exception as exc:  # many formats and failure types; report the file instead of failing the listing
        facts["unreadable"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return facts
    dtypes: dict[str, int] = {}
    for _, dtype in shapes.values():
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    count = sum(_product(shape) for shape, _ in shapes.values())
    facts.update(tensors=len(shapes), parameters=_human(count, ("", "K", "M", "B"), 1000), dtypes=dtypes)
    lora = {k: shape for k, (shape, _) in shapes.items() if ".lora_" in k}
    if lora:
        import torch

        from ..hlora import HLoRAStateError, infer_plugin_shape

        try:
            rank, experts = infer_plugin_shape({k: torch.empty(s, device="meta") for k, s in lora.items()})
            facts["hlora"] = {"rank": rank, "experts": experts, "tensors": len(lora)}
        except HLoRAStateError as exc:
            facts["hlora"] = str(exc)
    return facts


def _product(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _config_info(path: Path) -> dict[str, Any]:
    """The essentials of a HealthGPT config.json (variant, LLM, plugins with ranks) or of a transformers one."""
    from ..config import HealthGPTConfig

    try:
        config = HealthGPTConfig.load(path)
    except ValueError:
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not a readable JSON config ({exc})") from None
        keys = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "dtype", "torch_dtype")
        return {k: raw[k] for k in keys if isinstance(raw, dict) and k in raw}
    llm = config.llm
    facts = {
        "variant": config.name,
        "llm": f"{llm.arch} {llm.source}: {llm.num_layers} layers, hidden {llm.hidden_size}, context "
        f"{llm.max_position_embeddings}",
        "vision": f"{config.vision.source}: {config.vision.image_size}px, patch {config.vision.patch_size}",
        "plugins": {
            name: {"rank": p.rank, "alpha": p.alpha, "experts": p.num_experts, "vision_layer": p.vision_layer}
            for name, p in config.plugins.items()
        },
        "image_tokens": config.vq.num_codes if config.add_image_tokens else 0,
        "template": config.template,
        "dtype": config.dtype,
    }
    return facts | {"memory": _memory_info(config)}


def _memory_info(config: HealthGPTConfig) -> dict[str, dict[str, int]]:
    """Bytes by part (base, plugins, vision, VQGAN, total) in the config's dtype, unquantized and in each
    `--quantize` mode, computed from the architecture's shapes."""
    from ..checkpoints import resolve_dtype
    from ..config import QUANTIZE_MODES
    from ..quantize import estimate_memory

    dtype = resolve_dtype(config.dtype)
    table = {mode or "none": estimate_memory(config, dtype, mode) for mode in (None, *QUANTIZE_MODES)}
    return {mode: parts | {"total": sum(parts.values())} for mode, parts in table.items()}


def _checkpoint_info(path: Path) -> dict[str, Any]:
    """What a bundle, checkpoint folder, config or weight file holds."""
    facts: dict[str, Any] = {"path": str(path)}
    if path.is_dir():
        manifest = path / "bundle.json"
        if manifest.is_file():
            facts["bundle"] = json.loads(manifest.read_text())
        if (path / "config.json").is_file():
            facts["config"] = _config_info(path / "config.json")
        files = sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    elif path.suffix == ".json":
        facts["config"] = _config_info(path)
        files = []
    else:
        files = [path]
    root = path if path.is_dir() else path.parent
    facts["weights"] = [_weights_info(file, root) for file in files]
    facts["total_size"] = _human(sum(f.stat().st_size for f in files), ("B", "KB", "MB", "GB", "TB"), 1024)
    return facts


def _image_info(path: Path, uneven_slices: Literal["error", "resample"] = "error") -> dict[str, Any]:
    """Format, modality, shape, spacing, value range (HU for CT) and display window of an image or volume."""
    import numpy as np

    from ..io import load_image

    image = load_image(path, slice_index="all", uneven_slices=uneven_slices)
    if image.datasets:
        kind = "DICOM series" if path.is_dir() else "DICOM"
    else:
        nifti = path.name.lower().endswith((".nii", ".nii.gz"))
        kind = "NIfTI" if nifti else (path.suffix.lstrip(".").upper() or "raster")
    spacing: list[float] | None = None
    if image.affine is not None:
        steps = np.linalg.norm(image.affine[:3, :3], axis=0)
        spacing = [round(float(s), 4) for s in (steps if image.is_volume else steps[1:])]
    elif image.pixel_spacing is not None:
        spacing = [round(float(s), 4) for s in image.pixel_spacing]
    return {
        "path": str(path),
        "format": kind,
        "modality": image.modality,
        "shape": list(image.array.shape),
        "slices": image.num_slices,
        "colour": image.color,
        "spacing_mm": spacing,
        "value_range": [float(np.nanmin(image.array)), float(np.nanmax(image.array))],
        "units": "RGB 0-255" if image.color else "HU" if image.modality.upper() == "CT" else "stored values",
        "window": None if image.color else _window_info(image),
    }


def _window_info(image: MedicalImage) -> dict[str, Any]:
    """The window a grey image is shown with, and where it comes from."""
    from ..io import PercentileWindow, Window, default_window

    window = image.window or default_window(image.modality)
    if isinstance(window, Window):
        shown: dict[str, Any] = {"center": window.center, "width": window.width}
    elif isinstance(window, PercentileWindow):
        shown = {"percentiles": [window.low, window.high]}
    else:  # MultiWindow
        shown = {"rgb": [{"center": w.center, "width": w.width} for w in window.channels]}
    return {**shown, "from": "file or --window" if image.window is not None else f"default for {image.modality}"}


def _is_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return any((path / name).is_file() for name in ("bundle.json", "config.json")) or any(
            p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()
        )
    return path.suffix in (*WEIGHT_SUFFIXES, ".json")


def _as_text(value: dict | list, indent: int = 0) -> Iterator[str]:
    """`key: value` lines; nested mappings are indented, lists of mappings become `-` items."""
    pad = "  " * indent
    for key, item in value.items() if isinstance(value, dict) else enumerate(value):
        label = f"{pad}{key}:" if isinstance(value, dict) else f"{pad}-"
        if isinstance(item, dict) or (isinstance(item, list) and any(isinstance(v, dict) for v in item)):
            yield label
            yield from _as_text(item, indent + 1)
        else:
            yield f"{label} {jsonout.dumps(item, ensure_ascii=False) if isinstance(item, list) else item}"


@command
def info(
    path: Annotated[
        Path,
        typer.Argument(
            help="An image file or DICOM series folder; or a bundle, checkpoint folder, config.json or weight file "
            "(.safetensors, .bin, .pt, .ckpt).",
            show_default=False,
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json/--text", help="Print JSON instead of text.")] = False,
    uneven_slices: Annotated[
        Literal["error", "resample"],
        typer.Option(help="A DICOM stack whose slice gaps differ: refuse it, or describe it resampled evenly."),
    ] = "error",
) -> None:
    """Show what an image or a checkpoint holds.

    Images: format, modality, shape, spacing, value range (HU for CT), display window. Checkpoints: config,
    plugins with their H-LoRA ranks, the model's memory by part (base, plugins, vision, VQGAN) unquantized and per
    --quantize mode (computed from the config's shapes), tensors, dtypes and sizes."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: does not exist")
    facts = _checkpoint_info(path) if _is_checkpoint(path) else _image_info(path, uneven_slices)
    typer.echo(jsonout.dumps(facts, indent=2, ensure_ascii=False) if as_json else "\n".join(_as_text(facts)))
