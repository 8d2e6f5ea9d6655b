"""Weight-only quantization of the base LLM's linears, and the model's memory by part.

Only the `nn.Linear`s that H-LoRA wraps (`HLoRALinear.base_layer`) are quantized: the plugins, projectors, fusion
tables, embeddings and head stay in full precision on top, as in QLoRA. int8 and int4 go through torchao (int8
per-row on any device; int4 group-wise with torchao's CPU kernel on CPU and tinygemm on CUDA, which needs
bfloat16); nf4 goes through bitsandbytes, whose 4-bit kernels run on CUDA only. torchao is imported on first use.

Linears are quantized one at a time on the target device, so a model loaded (memory-mapped) on the CPU never holds
more than one full-precision linear on the accelerator.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from .config import QUANTIZE_MODES as MODES
from .config import HealthGPTConfig
from .errors import HealthGPTError
from .hlora import HLoRALinear
from .logs import quiet_library_logs

log = logging.getLogger(__name__)

TRAINABLE_MODES = ("int8", "nf4")  # torchao's int4 kernels have no backward
# The largest int4 group size that divides a linear's input width is used. Smaller groups round a little better
# (logits' relative error on the random small config 0.145 -> 0.119 at 32, trained nano 0.055 -> 0.046) but each
# (scale, zero) pair costs 4 bytes: L14's int4 peak would be 10.23 GB at 64 and XL32's 22.11 GB at 32, past the
# 10 / 22 GB goals (bench/quantize.py). The scales are torchao's default min/max ("tinygemm") choice, not HQQ: HQQ
# won on some random models and lost on others (mean logits' error over seven models 0.121 vs 0.117) and is ~100x
# slower to quantize on CPU (48 s for one 5120x5120 linear).
INT4_GROUP_SIZES = (128, 64, 32)
NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one fp32 absmax per block


class QuantizationError(HealthGPTError):
    """A quantization mode this device, dtype or installation cannot run; the message says what to do instead."""


def check_mode(mode: str | None, device: str | torch.device, dtype: torch.dtype, *, training: bool = False) -> None:
    """Refuse a mode that cannot run here, before anything is loaded or changed."""
    if mode is None:
        return
    if mode not in MODES:
        raise QuantizationError(f"quantize must be one of {', '.join(MODES)} or None, got {mode!r}")
    kind = torch.device(device).type
    if training and mode not in TRAINABLE_MODES:
        raise QuantizationError(
            f"cannot train over an {mode} base: torchao's int4 kernels have no backward; use quantize=int8 "
            "(any device) or nf4 (CUDA)"
        )
    if mode == "nf4" and kind != "cuda":
        raise QuantizationError(
            f"nf4 needs bitsandbytes' 4-bit kernels, which run on CUDA only, not on {kind}: use quantize=int4 or "
            "int8 (torchao) here, or nf4 with --device cuda"
        )
    if mode == "int4" and kind == "cuda" and dtype != torch.bfloat16:
        raise QuantizationError(
            f"int4 on CUDA uses torchao's tinygemm kernel, which needs bfloat16 weights, not {dtype}: load with "
            "dtype=bfloat16"
        )
    if mode == "int4" and kind not in ("cpu", "cuda"):
        raise QuantizationError(f"torchao has no int4 kernel for {kind}: use quantize=int8, or run on cpu or cuda")
    if mode == "nf4":
        _bitsandbytes()
    else:
        _torchao_quantization()


def _torchao_quantization() -> Any:
    """`torchao.quantization`, imported quietly; a clear error when torchao is missing."""
    try:
        with quiet_library_logs():
            import torchao.quantization
    except ImportError as e:
        raise QuantizationError(f"int8/int4 quantization needs torchao: pip install 'healthgpt[quant]' ({e})") from None
    return torchao.quantization


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as e:
        raise QuantizationError(f"nf4 quantization needs bitsandbytes: pip install bitsandbytes ({e})") from None
    return bitsandbytes


def _wrappers(model: nn.Module) -> dict[str, HLoRALinear]:
    return {path: m for path, m in model.named_modules() if isinstance(m, HLoRALinear)}


def base_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The base LLM's linears that H-LoRA wraps (what quantization replaces), by the wrapper's path."""
    return {path: m.base_layer for path, m in _wrappers(model).items()}


def int4_group_size(in_features: int) -> int | None:
    """The int4 group size used for a linear of this input width (None: no group size divides it)."""
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def quantize_base(
    model: nn.Module, mode: str | None, device: str | torch.device | None = None, *, training: bool = False
) -> int:
    """Quantize the base linears of `model` in place with `mode`, each moved to `device` first (None: where it is,
    e.g. dispatched by a device map); returns how many were quantized (a linear whose width no int4 group size
    divides stays in full precision, with a log line)."""
    wrappers = _wrappers(model)
    if mode is None or not wrappers:
        return 0
    weights = [w.base_layer.weight for w in wrappers.values()]
    targets = [torch.device(device) if device is not None else w.device for w in weights]
    for target in set(targets):
        check_mode(mode, target, weights[0].dtype, training=training)
    done_before = [path for path, w in wrappers.items() if is_quantized(w.base_layer.weight)]
    if done_before:
        raise QuantizationError(f"{done_before[0]} is already quantized: load the model again without quantize")
    if mode == "int4" and weights[0].dtype == torch.float32 and "cpu" in {t.type for t in targets}:
        log.warning("int4 on CPU is much slower with float32 than bfloat16 weights: load with dtype=bfloat16 (--dtype)")
    quantize_one = _nf4_quantizer() if mode == "nf4" else _torchao_quantizer(mode)
    done = 0
    for (path, wrapper), target in zip(wrappers.items(), targets, strict=True):
        wrapper.base_layer.to(target)
        done += quantize_one(path, wrapper, target)
    log.info(
        "quantized %d of %d base LLM linears to %s on %s", done, len(wrappers), mode, sorted(map(str, set(targets)))
    )
    return done


def _torchao_quantizer(mode: str) -> Any:
    """quantize(path, wrapper, device) -> whether its base linear was quantized (in place, by torchao's `quantize_`)."""
    ao = _torchao_quantization()

    def config(in_features: int, cuda: bool) -> Any:
        if mode == "int8":
            return ao.Int8WeightOnlyConfig(set_inductor_config=False)
        group = int4_group_size(in_features)
        if group is None:
            return None
        if cuda:
            return ao.Int4WeightOnlyConfig(
                group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
            )
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig  # the CPU kernel's layout

        return PrototypeInt4WeightOnlyConfig(group_size=group, set_inductor_config=False)

    def quantize(path: str, wrapper: HLoRALinear, device: torch.device) -> bool:
        cfg = config(wrapper.in_features, device.type == "cuda")
        if cfg is None:
            log.info("%s: no int4 group size %s divides width %d; kept", path, INT4_GROUP_SIZES, wrapper.in_features)
            return False
        ao.quantize_(wrapper.base_layer, cfg)
        return True

    return quantize


def _nf4_quantizer() -> Any:
    """quantize(path, wrapper, device) -> True, replacing its base linear by a bitsandbytes nf4 `Linear4bit`
    (computing in the weight's dtype); `Params4bit` quantizes when it moves to the CUDA device."""
    bnb = _bitsandbytes()

    def quantize(path: str, wrapper: HLoRALinear, device: torch.device) -> bool:
        linear = wrapper.base_layer
        quantized = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=linear.weight.dtype,
            quant_type="nf4",
            device="meta",
        )
        weight = linear.weight.data.cpu()
        quantized.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4").to(device)
        if linear.bias is not None:
            quantized.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        wrapper.base_layer = quantized
        return True

    return quantize


def is_quantized(t: Tensor) -> bool:
    """Whether a weight is a quantized tensor (a torchao tensor subclass or a bitsandbytes 4-bit parameter)."""
    return is_traceable_wrapper_subclass(t) or hasattr(t, "quant_state")


def tensor_bytes(t: Tensor) -> int:
    """Bytes a tensor holds: a quantized tensor's inner tensors (data, scales, zero points), not its logical size."""
    if is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    state = getattr(t, "quant_state", None)
    extra = 0 if state is None else sum(v.nbytes for v in vars(state).values() if isinstance(v, Tensor))
    return t.nbytes + extra


def _module_bytes(tensors: Mapping[int, Tensor], exclude: set[int]) -> int:
    return sum(tensor_bytes(t) for key, t in tensors.items() if key not in exclude)


def _tensors(module: nn.Module | None) -> dict[int, Tensor]:
    """Parameters and buffers of a module, each once (tied weights are one tensor)."""
    if module is None:
        return {}
    found = {id(t): t for t in module.parameters()}
    found.update({id(t): t for t in module.buffers()})
    return found


def memory_by_part(model: nn.Module, vqgan: nn.Module | None = None) -> dict[str, int]:
    """Bytes of a `HealthGPTModel` by part: `base` (the LLM's own weights, quantized or not), `plugins` (H-LoRA,
    projectors and plugin tables), `vision` (CLIP) and `vqgan`."""
    plugins = {id(p): p for layer in model.hlora.layers.values() for p in layer.plugins.parameters()}
    plugins |= _tensors(model.projectors)
    for table in (model.llm.get_input_embeddings(), model.llm.get_output_embeddings()):
        plugins |= {id(p): p for p in getattr(table, "tables", {}).values()}
    return {
        "base": _module_bytes(_tensors(model.llm), set(plugins)),
        "plugins": _module_bytes(plugins, set()),
        "vision": _module_bytes(_tensors(model.vision), set()),
        "vqgan": _module_bytes(_tensors(vqgan), set()),
    }


def quantized_linear_bytes(out_features: int, in_features: int, mode: str | None, dtype: torch.dtype) -> int:
    """Bytes of a linear's weight once quantized with `mode` (the layouts torchao and bitsandbytes store; tested
    against them): int8 keeps an fp32 scale and an int8 zero point per row, int4 an (scale, zero) pair in the
    weight's dtype per group, nf4 an fp32 absmax per block of 64."""
    n = out_features * in_features
    if mode is None:
        return n * dtype.itemsize
    if mode == "int8":
        return n + out_features * (4 + 1)
    if mode == "nf4":
        return n // 2 + (n // NF4_BLOCK) * 4
    group = int4_group_size(in_features)
    if group is None:
        return n * dtype.itemsize
    return n // 2 + (in_features // group) * out_features * 2 * dtype.itemsize


def estimate_memory(config: HealthGPTConfig, dtype: torch.dtype, mode: str | None) -> dict[str, int]:
    """Bytes by part (as `memory_by_part`) of a model of `config` in `dtype` with its base linears quantized by
    `mode`, computed from the shapes of the real architecture built on the meta device (nothing is allocated)."""
    from .api import HealthGPT

    with torch.device("meta"):
        hg = HealthGPT.random(config)
    hg.model.to(dtype)
    parts = memory_by_part(hg.model, hg.vqgan)
    for linear in base_linears(hg.model).values():
        full = linear.weight.numel() * dtype.itemsize
        parts["base"] += quantized_linear_bytes(linear.out_features, linear.in_features, mode, dtype) - full
    return parts


def format_memory(parts: Mapping[str, int]) -> str:
    """`base 1.2 GB, plugins 80.0 MB, ... (total 1.5 GB)`."""
    shown = [f"{name} {_size(n)}" for name, n in parts.items()]
    return ", ".join(shown) + f" (total {_size(sum(parts.values()))})"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
