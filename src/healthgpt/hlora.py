"""H-LoRA: named plugins of fused low-rank expert mixtures wrapped around the `nn.Linear`s of a model.

Each plugin of a linear holds one A [R, in], one B [out, R] and one router [k, in]; the k experts are the
consecutive rank blocks of size R/k (REFERENCE §2.2). Several plugins (comprehension, generation, ...) live
side by side over the same frozen base weights, and the plugin is chosen per call or per sample through one
`PluginSelection` shared by every wrapper of a model. The selection is set only inside `HLoRAController.use`, which
holds the model's lock, so threads sharing a model take turns per forward and never see each other's plugins.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from healthgpt.config import PluginConfig
from healthgpt.errors import HealthGPTError

Selection = str | tuple[str | None, ...] | Tensor | None


class HLoRAStateError(HealthGPTError):
    """A plugin state dict does not fit the injected plugin (missing, unexpected or mis-shaped keys)."""


class HLoRAPlugin(nn.Module):
    """One plugin of one linear: a dense-routed mixture of `num_experts` LoRA experts stored fused."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        num_experts: int,
        dropout: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        init: bool = True,
    ) -> None:
        super().__init__()
        if rank % num_experts:
            raise ValueError(f"H-LoRA rank {rank} must be a multiple of num_experts {num_experts}")
        self.rank = rank
        self.alpha = alpha
        self.num_experts = num_experts
        self.scaling = alpha / rank * num_experts  # the released code divides by the total rank (§2.2)
        # Built on the meta device and then given real storage, so the weights are initialised once (by
        # `reset_parameters`), or not at all when `init=False` because loaded weights will overwrite them.
        self.lora_A = nn.Linear(in_features, rank, bias=False, device="meta", dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device="meta", dtype=dtype)
        self.lora_route = nn.Linear(in_features, num_experts, bias=False, device="meta", dtype=dtype)
        self.to_empty(device=device or "cpu")
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if init:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """Training init of §2.2: A and router Kaiming-uniform(a=√5), B zeros (starts as a no-op)."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.lora_route.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        """The delta only, scaling · Σ_e softmax(route(x))_e · B_e A_e x, in x's dtype: [..., out]."""
        out_dtype = x.dtype
        x = x.to(self.lora_A.weight.dtype)
        gate = torch.softmax(self.lora_route(x), dim=-1).to(out_dtype)  # [..., k]
        a = self.dropout(self.lora_A(x) * self.scaling)  # [..., R]
        # repeat_interleave(gate, R/k) ⊙ a, done by broadcasting: [..., k, R/k] * [..., k, 1] -> [..., R]
        h = (a.unflatten(-1, (self.num_experts, -1)) * gate.unsqueeze(-1)).flatten(-2)
        return self.lora_B(h.to(self.lora_B.weight.dtype)).to(out_dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, num_experts={self.num_experts}, scaling={self.scaling:g}"


class PluginSelection:
    """Which plugins the wrappers of one model apply: None (base only), one name for every row, one name (or None)
    per sample along dim 0, or a long tensor [B] of indices into `names` (the form a compiled decode step takes:
    rows pick plugins by tensor arithmetic, so one captured graph serves every mix). Shared by reference, so
    switching touches no layer."""

    def __init__(self) -> None:
        self.active: Selection = None
        self.names: tuple[str, ...] = ()  # plugin order for tensor selections
        self._rows: dict[str, list[int]] = {}
        self._groups: dict[torch.device, list[tuple[str, Tensor]]] = {}

    def set(self, plugins: str | Sequence[str | None] | Tensor | None) -> None:
        """Select plugins (see the class docstring); sequences are copied, so later edits do not leak in."""
        if isinstance(plugins, Tensor):
            self.active, self._rows, self._groups = plugins, {}, {}
            return
        self.active = plugins if plugins is None or isinstance(plugins, str) else tuple(plugins)
        self._rows = {}
        for i, name in enumerate(self.active if isinstance(self.active, tuple) else ()):
            if name is not None:
                self._rows.setdefault(name, []).append(i)
        self._groups = {}

    def groups(self, device: torch.device) -> list[tuple[str, Tensor]]:
        """For a per-sample selection: (plugin, row indices) for each plugin present, cached per device."""
        if device not in self._groups:
            self._groups[device] = [(n, torch.tensor(r, device=device)) for n, r in self._rows.items()]
        return self._groups[device]


def _unknown_plugin(name: object, known: Iterable[str]) -> ValueError:
    return ValueError(f"unknown H-LoRA plugin {name!r}; known plugins: {', '.join(known) or '(none)'}")


class HLoRALinear(nn.Module):
    """An `nn.Linear` (kept as `base_layer`, frozen by the caller) plus named H-LoRA plugins; the shared
    `PluginSelection` decides which plugin each row gets."""

    def __init__(self, base_layer: nn.Linear, selection: PluginSelection) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.plugins = nn.ModuleDict()
        self.selection = selection
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features

    def add_plugin(
        self, name: str, cfg: PluginConfig, dtype: torch.dtype | None = None, init: bool = True
    ) -> HLoRAPlugin:
        """Attach a plugin on the base layer's device (dtype defaults to the base's); `init=False` leaves its
        weights uninitialised for a loader to fill."""
        if name in self.plugins:
            raise ValueError(f"H-LoRA plugin {name!r} already exists")
        weight = self.base_layer.weight
        plugin = HLoRAPlugin(
            self.in_features,
            self.out_features,
            cfg.rank,
            cfg.alpha,
            cfg.num_experts,
            cfg.dropout,
            device=weight.device,
            dtype=dtype or weight.dtype,
            init=init,
        )
        self.plugins[name] = plugin
        return plugin

    def _plugin(self, name: str) -> HLoRAPlugin:
        if name not in self.plugins:
            raise _unknown_plugin(name, self.plugins.keys())
        return self.plugins[name]

    def forward(self, x: Tensor) -> Tensor:
        """base(x) plus the selected plugin's delta; per-sample selections add each delta to its rows only."""
        y = self.base_layer(x)
        active = self.selection.active
        if active is None:
            return y
        if isinstance(active, str):
            return y + self._plugin(active)(x).to(y.dtype)
        if isinstance(active, Tensor):  # per-row plugin indices: every plugin runs, each row keeps its own delta
            for index, name in enumerate(self.selection.names):
                keep = (active == index).to(y.dtype).view(-1, *[1] * (y.dim() - 1))
                y = y + keep * self._plugin(name)(x).to(y.dtype)
            return y
        if len(active) != x.shape[0]:
            raise ValueError(
                f"per-sample H-LoRA selection has {len(active)} entries but the input has {x.shape[0]} "
                f"samples (dim 0 of shape {tuple(x.shape)})"
            )
        groups = self.selection.groups(x.device)
        if len(groups) == 1 and len(groups[0][1]) == x.shape[0]:
            return y + self._plugin(groups[0][0])(x).to(y.dtype)
        for name, rows in groups:
            delta = self._plugin(name)(x.index_select(0, rows))  # [n_rows, ..., out]
            y = y.index_add(0, rows, delta.to(y.dtype))  # out-of-place: autograd sees both terms
        return y


class HLoRAController:
    """Handle returned by `inject_hlora`: the wrapped layers, plugin selection, freezing and plugin state."""

    def __init__(self, layers: dict[str, HLoRALinear], selection: PluginSelection, dtype: torch.dtype | None) -> None:
        self.layers = layers
        self.selection = selection
        self.dtype = dtype
        self.configs: dict[str, PluginConfig] = {}
        self.lock = threading.RLock()  # held while a selection is in force (see the module docstring)

    @property
    def plugin_names(self) -> tuple[str, ...]:
        return tuple(self.configs)

    def _check(self, name: str) -> None:
        if name not in self.configs:
            raise _unknown_plugin(name, self.configs)

    def add_plugin(self, name: str, cfg: PluginConfig, init: bool = True) -> None:
        """Add a plugin to every wrapped layer: freshly initialised, or uninitialised (`init=False`) for a loader."""
        if name in self.configs:
            raise ValueError(f"H-LoRA plugin {name!r} already exists")
        for layer in self.layers.values():
            layer.add_plugin(name, cfg, self.dtype, init)
        self.configs[name] = cfg
        self.selection.names = tuple(self.configs)

    @contextmanager
    def use(self, plugins: str | Sequence[str | None] | Tensor | None) -> Iterator[None]:
        """Within the block apply no plugin (None), one plugin to all rows (a name), or one per sample (a
        sequence of names, None = base only, or a tensor of indices into `plugin_names`, along dim 0 of every
        input); then restore the previous one. Holds the model's lock for the block."""
        if plugins is not None and not isinstance(plugins, Tensor):
            for name in [plugins] if isinstance(plugins, str) else plugins:
                if name is not None:
                    self._check(name)
        with self.lock:
            previous = self.selection.active
            self.selection.set(plugins)
            try:
                yield
            finally:
                self.selection.set(previous)

    def parameters_of(self, plugin: str) -> list[nn.Parameter]:
        """Adapter parameters (A, B, router of every layer) of one plugin."""
        self._check(plugin)
        return [p for layer in self.layers.values() for p in layer.plugins[plugin].parameters()]

    def plugin_state_dict(self, plugin: str) -> dict[str, Tensor]:
        """One plugin's tensors keyed `{path of the original Linear}.lora_{A|B|route}.weight` (§2.4 without
        the `base_model.model.` prefix)."""
        self._check(plugin)
        return {
            f"{path}.{key}": value
            for path, layer in self.layers.items()
            for key, value in layer.plugins[plugin].state_dict().items()
        }


def _matches(path: str, names: Iterable[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


def inject_hlora(
    model: nn.Module,
    plugins: Mapping[str, PluginConfig],
    targets: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
    dtype: torch.dtype | None = None,
    init: bool = True,
) -> HLoRAController:
    """Wrap every `nn.Linear` whose path ends with a target name in an `HLoRALinear` holding `plugins`
    (initialised for training, or left uninitialised with `init=False` when a loader fills them next).

    Default targets: the last path components of all `nn.Linear`s minus `exclude`. Each target must match at
    least one module, and only `nn.Linear`s. Plugin dtype defaults to each base layer's. The selection starts
    as None (base model); parameter `requires_grad` is left as is (training.stages.prepare_stage freezes).
    """
    modules = dict(model.named_modules())
    if any(isinstance(m, HLoRALinear) for m in modules.values()):
        raise ValueError("model already has H-LoRA layers; add plugins with HLoRAController.add_plugin")
    exclude = tuple(exclude)
    linears = [path for path, m in modules.items() if isinstance(m, nn.Linear)]
    if targets is None:
        targets = {path.rsplit(".", 1)[-1] for path in linears}
    targets = sorted(set(targets) - set(exclude))
    if not targets:
        raise ValueError("no H-LoRA targets: the model has no nn.Linear outside the excluded names")
    candidates = [p for p in modules if p and not _matches(p, exclude)]
    matched = {t: [p for p in candidates if _matches(p, [t])] for t in targets}
    unmatched = [t for t, paths in matched.items() if not paths]
    if unmatched:
        raise ValueError(f"H-LoRA targets matched no module of {type(model).__name__}: {', '.join(unmatched)}")
    for t, paths in matched.items():
        wrong = [f"{p} ({type(modules[p]).__name__})" for p in paths if not isinstance(modules[p], nn.Linear)]
        if wrong:
            raise ValueError(f"H-LoRA target {t!r} matches non-Linear modules: {', '.join(wrong)}")

    selection = PluginSelection()
    layers: dict[str, HLoRALinear] = {}
    chosen = {p for paths in matched.values() for p in paths}
    for path in [p for p in modules if p in chosen]:
        parent, _, child = path.rpartition(".")
        wrapper = HLoRALinear(modules[path], selection)
        setattr(model.get_submodule(parent), child, wrapper)
        layers[path] = wrapper
    controller = HLoRAController(layers, selection, dtype)
    for name, cfg in plugins.items():
        controller.add_plugin(name, cfg, init)
    return controller


def infer_plugin_shape(state: Mapping[str, Tensor]) -> tuple[int, int]:
    """(total rank R, experts k) of a plugin state dict, read from the lora_A / lora_B / lora_route shapes and
    checked to agree across all layers (keys may carry any prefix)."""
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")}
    ranks |= {v.shape[1] for k, v in state.items() if k.endswith("lora_B.weight")}
    experts = {v.shape[0] for k, v in state.items() if k.endswith("lora_route.weight")}
    if len(ranks) != 1 or len(experts) != 1:
        raise HLoRAStateError(
            f"cannot infer the H-LoRA shape: ranks found {sorted(ranks)}, "
            f"expert counts found {sorted(experts)} (need exactly one of each)"
        )
    return ranks.pop(), experts.pop()
