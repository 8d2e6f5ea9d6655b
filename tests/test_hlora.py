"""H-LoRA against independent references: peft LoRA (k=1), a naive expert loop, per-sample runs, HF keys."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Phi3Config, Phi3ForCausalLM, Qwen2Config, Qwen2ForCausalLM

from healthgpt.config import PluginConfig
from healthgpt.hlora import (
    HLoRAController,
    HLoRALinear,
    HLoRAPlugin,
    HLoRAStateError,
    PluginSelection,
    infer_plugin_shape,
    inject_hlora,
)

PHI3_TARGETS = {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
QWEN2_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
PLUGINS = {"comprehension": PluginConfig(rank=8, alpha=16), "generation": PluginConfig(rank=16, alpha=32)}


def tiny_phi3(seed: int = 0) -> Phi3ForCausalLM:
    torch.manual_seed(seed)
    return Phi3ForCausalLM(Phi3Config(**TINY)).eval()


def tiny_qwen2(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**TINY, num_key_value_heads=2)).eval()


def randomize(controller: HLoRAController, plugin: str, seed: int) -> None:
    """Give a plugin non-zero B (init is B = 0, which would hide every bug in the delta)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in controller.parameters_of(plugin):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def injected_phi3(seed: int = 0) -> tuple[Phi3ForCausalLM, HLoRAController]:
    model = tiny_phi3(seed)
    controller = inject_hlora(model, PLUGINS)
    for i, name in enumerate(controller.plugin_names):
        randomize(controller, name, seed * 10 + i + 1)
    return model, controller


def train_only(model: torch.nn.Module, controller: HLoRAController, plugin: str) -> None:
    """Freeze the model but one plugin's adapters (what training.stages.prepare_stage does for a HealthGPTModel)."""
    model.requires_grad_(False)
    for p in controller.parameters_of(plugin):
        p.requires_grad_(True)


def naive_moe_lora(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, route: torch.Tensor, alpha: float, k: int
) -> torch.Tensor:
    """sum_e g_e(x) * B_e A_e x * alpha / R * k, one expert at a time."""
    R = A.shape[0]
    r = R // k
    gates = torch.softmax(x @ route.T, dim=-1)
    out = torch.zeros(*x.shape[:-1], B.shape[0], dtype=x.dtype)
    for e in range(k):
        A_e, B_e = A[e * r : (e + 1) * r], B[:, e * r : (e + 1) * r]
        out = out + gates[..., e : e + 1] * (x @ A_e.T @ B_e.T) * (alpha / R * k)
    return out


def test_init_is_kaiming_uniform_for_a_and_router_and_zero_for_b() -> None:
    torch.manual_seed(0)
    plugin = HLoRAPlugin(256, 96, rank=16, alpha=32, num_experts=4)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    for w in (plugin.lora_A.weight, plugin.lora_route.weight):
        assert w.abs().max() <= bound
        assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.15)  # std of U(-b, b)
    assert torch.count_nonzero(plugin.lora_B.weight) == 0
    assert torch.count_nonzero(plugin(torch.randn(3, 256))) == 0
    assert plugin.scaling == 32 / 16 * 4


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_fused_plugin_equals_naive_expert_loop(k: int) -> None:
    torch.manual_seed(k)
    plugin = HLoRAPlugin(32, 48, rank=8, alpha=12, num_experts=k)
    with torch.no_grad():
        plugin.lora_B.weight.normal_()
    A, B, route = (m.weight.detach() for m in (plugin.lora_A, plugin.lora_B, plugin.lora_route))
    for x in (torch.randn(3, 5, 32), torch.randn(7, 32)):
        expected = naive_moe_lora(x, A, B, route, alpha=12, k=k)
        torch.testing.assert_close(plugin(x), expected, atol=1e-5, rtol=1e-5)
    base = torch.nn.Linear(32, 48)
    layer = HLoRALinear(base, PluginSelection())
    layer.add_plugin("p", PluginConfig(rank=8, alpha=12, num_experts=k))
    layer.plugins["p"].load_state_dict(plugin.state_dict())
    layer.selection.set("p")
    torch.testing.assert_close(layer(x), base(x) + expected, atol=1e-5, rtol=1e-5)


def test_one_expert_matches_peft_lora_outputs_and_gradients() -> None:
    base = tiny_phi3()
    ref = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=sorted(PHI3_TARGETS))
    )
    gen = torch.Generator().manual_seed(1)
    state = {}
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
                key = name.removeprefix("base_model.model.").replace(".default.weight", ".weight")
                state[key] = p.clone()
    model = base
    controller = inject_hlora(model, {"comprehension": PluginConfig(rank=8, alpha=16, num_experts=1)})
    for path in controller.layers:  # one expert: softmax is 1 whatever the router holds
        state[f"{path}.lora_route.weight"] = torch.randn(1, 64 if "down" not in path else 128)
    with torch.no_grad():  # plugin_state_dict tensors share storage with the parameters
        for key, tensor in controller.plugin_state_dict("comprehension").items():
            tensor.copy_(state[key])
    train_only(model, controller, "comprehension")

    ids = torch.randint(3, 128, (2, 7), generator=gen)
    weights = torch.randn(2, 7, 128, generator=gen)
    emb_ref = ref.get_input_embeddings()(ids).detach().requires_grad_()
    emb = model.get_input_embeddings()(ids).detach().requires_grad_()
    logits_ref = ref(inputs_embeds=emb_ref).logits
    with controller.use("comprehension"):
        logits = model(inputs_embeds=emb).logits
    (logits_ref * weights).sum().backward()
    (logits * weights).sum().backward()

    torch.testing.assert_close(logits, logits_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb.grad, emb_ref.grad, atol=1e-5, rtol=1e-5)
    ref_params = dict(ref.named_parameters())
    for path, layer in controller.layers.items():
        for ab in ("lora_A", "lora_B"):
            expected = ref_params[f"base_model.model.{path}.{ab}.default.weight"].grad
            torch.testing.assert_close(
                getattr(layer.plugins["comprehension"], ab).weight.grad, expected, atol=1e-5, rtol=1e-5
            )


def test_mixed_batch_equals_each_sample_alone_with_its_plugin() -> None:
    model, controller = injected_phi3()
    ids = torch.randint(3, 128, (5, 6), generator=torch.Generator().manual_seed(2))
    names = ["generation", "comprehension", None, "comprehension", "generation"]
    weights = torch.randn(5, 6, 128, generator=torch.Generator().manual_seed(3))
    params = controller.parameters_of("comprehension") + controller.parameters_of("generation")

    # A batch of 5 and a batch of 1 sum in different orders with two threads (float32: logits 6.5e-6 apart, gradients
    # 1e-5 of their scale on this CPU), so they agree to 1e-5 / 1e-4 of scale; a row on the wrong plugin is 1e-2 away.
    with controller.use(names):
        logits = model(ids).logits
    grads = torch.autograd.grad((logits * weights).sum(), params)
    alone_grads = [torch.zeros_like(p) for p in params]
    for i, name in enumerate(names):
        with controller.use(name):
            alone = model(ids[i : i + 1]).logits
        torch.testing.assert_close(logits[i : i + 1], alone, atol=1e-5, rtol=1e-5)
        sample_grads = torch.autograd.grad((alone * weights[i]).sum(), params, allow_unused=True)
        for total, g in zip(alone_grads, sample_grads, strict=True):
            if g is not None:
                total += g
    for g, expected in zip(grads, alone_grads, strict=True):  # to 1e-4 of each gradient's scale (up to ~700 here)
        torch.testing.assert_close(g, expected, atol=1e-4 * float(expected.abs().max()), rtol=1e-4)

    with torch.no_grad(), controller.use("comprehension"):  # the plugins really differ, and from the base
        comp = model(ids[:1]).logits
    with torch.no_grad():
        base = model(ids[:1]).logits
    assert (comp - logits[:1]).abs().max() > 1e-2 and (comp - base).abs().max() > 1e-2
    torch.testing.assert_close(logits[2:3], model(ids[2:3]).logits, atol=1e-5, rtol=1e-5)


def test_qwen2_default_targets_and_mixed_batch_with_biases() -> None:
    model = tiny_qwen2()
    controller = inject_hlora(model, PLUGINS)
    assert {path.rsplit(".", 1)[-1] for path in controller.layers} == QWEN2_TARGETS
    assert len(controller.layers) == 7 * 2 and not isinstance(model.lm_head, HLoRALinear)
    assert model.model.layers[0].self_attn.q_proj.base_layer.bias is not None
    for i, name in enumerate(controller.plugin_names):
        randomize(controller, name, i)
    ids = torch.randint(3, 128, (3, 5), generator=torch.Generator().manual_seed(4))
    names = ["comprehension", "generation", "comprehension"]
    with torch.no_grad(), controller.use(names):
        logits = model(ids).logits
    for i, name in enumerate(names):
        with torch.no_grad(), controller.use(name):
            # fp32 GEMMs block differently with the batch size: ~1e-6 noise at these activation scales
            torch.testing.assert_close(logits[i : i + 1], model(ids[i : i + 1]).logits, atol=5e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_per_sample_layer_in_half_precision_matches_fp32_reference(dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    base = torch.nn.Linear(32, 40)
    layer = HLoRALinear(base, PluginSelection())
    for name, cfg in PLUGINS.items():
        layer.add_plugin(name, cfg)
        with torch.no_grad():
            layer.plugins[name].lora_B.weight.normal_(0, 0.2)
    names = ["generation", "comprehension", "generation", "comprehension"]
    x = torch.randn(4, 3, 32)
    expected = base(x).detach().clone()
    for i, name in enumerate(names):
        p = layer.plugins[name]
        expected[i] += naive_moe_lora(
            x[i], p.lora_A.weight, p.lora_B.weight, p.lora_route.weight, PLUGINS[name].alpha, PLUGINS[name].num_experts
        ).detach()

    half = copy.deepcopy(layer).to(dtype)
    half.selection.set(names)
    with torch.no_grad():
        for xs, exp in ((x, expected), (x[:, 0], expected[:, 0])):  # [B, T, in] and [N, in]
            y = half(xs.to(dtype))
            assert y.dtype == dtype
            torch.testing.assert_close(y.float(), exp, atol=0.1, rtol=0.05)
    xh = x.to(dtype).requires_grad_()
    half(xh).sum().backward()
    assert xh.grad.dtype == dtype and torch.isfinite(xh.grad).all()
    assert all(p.grad is not None for p in half.plugins.parameters())

    mixed = inject_hlora(torch.nn.Sequential(copy.deepcopy(base).to(dtype)), PLUGINS, dtype=torch.float32)
    wrapped = mixed.layers["0"]
    for name in PLUGINS:
        wrapped.plugins[name].load_state_dict(layer.plugins[name].state_dict())
    assert wrapped.plugins["generation"].lora_A.weight.dtype == torch.float32
    with torch.no_grad(), mixed.use(names):
        y = wrapped(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), expected, atol=0.1, rtol=0.05)


def test_training_generation_only_keeps_comprehension_and_base_bit_identical() -> None:
    model, controller = injected_phi3()
    train_only(model, controller, "generation")
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in controller.parameters_of("generation")}

    ids = torch.randint(3, 128, (4, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), controller.use("comprehension"):
        comp_before = model(ids).logits
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}  # base and comprehension
    frozen_before = {n: p.detach().clone() for n, p in frozen.items()}
    gen_before = [p.detach().clone() for p in controller.parameters_of("generation")]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # frozen params must stay put
    for _ in range(3):
        with controller.use(["generation", "comprehension", "generation", "generation"]):
            loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad(), controller.use("comprehension"):
        assert torch.equal(model(ids).logits, comp_before)
    assert all(torch.equal(p, frozen_before[n]) for n, p in frozen.items())
    gen_after = controller.parameters_of("generation")
    assert all(not torch.equal(a, b) for a, b in zip(gen_after, gen_before, strict=True))


def test_plugin_state_dict_round_trip() -> None:
    """Keys and shapes of one plugin's tensors, and a copy into a fresh model reproduces the logits; strict loading
    of such files (missing, unused, mis-shaped keys) is tested on the production path in test_checkpoints."""
    model, controller = injected_phi3(seed=0)
    state = controller.plugin_state_dict("generation")
    assert len(state) == 3 * len(controller.layers) == 3 * 4 * 2
    assert state["model.layers.0.self_attn.qkv_proj.lora_A.weight"].shape == (16, 64)
    assert state["model.layers.1.mlp.down_proj.lora_B.weight"].shape == (64, 16)
    assert state["model.layers.1.mlp.gate_up_proj.lora_route.weight"].shape == (4, 64)

    other = tiny_phi3()  # same base weights, freshly initialised plugins
    other_ctl = inject_hlora(other, PLUGINS)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():  # plugin_state_dict tensors share storage with the parameters
        for key, tensor in other_ctl.plugin_state_dict("generation").items():
            tensor.copy_(state[key])
    with torch.no_grad(), controller.use("generation"):
        expected = model(ids).logits
    with torch.no_grad(), other_ctl.use("generation"):
        assert torch.equal(other(ids).logits, expected)


def test_infer_plugin_shape_reads_rank_and_experts() -> None:
    model = tiny_phi3()
    plugins = {"comprehension": PluginConfig(8, 16, num_experts=2), "generation": PluginConfig(16, 32)}
    controller = inject_hlora(model, plugins)
    assert infer_plugin_shape(controller.plugin_state_dict("comprehension")) == (8, 2)
    official = {"base_model.model." + k: v for k, v in controller.plugin_state_dict("generation").items()}
    assert infer_plugin_shape(official) == (16, 4)
    mixed = {**controller.plugin_state_dict("comprehension"), **{"x." + k: v for k, v in official.items()}}
    with pytest.raises(HLoRAStateError, match=r"ranks found \[8, 16\]"):
        infer_plugin_shape(mixed)


def test_selection_is_scoped_nested_and_validated() -> None:
    model, controller = injected_phi3()
    selection = controller.selection
    with controller.use("generation"):
        with controller.use(["comprehension", None]):
            assert selection.active == ("comprehension", None)
        assert selection.active == "generation"
        with pytest.raises(RuntimeError), controller.use("comprehension"):
            raise RuntimeError
        assert selection.active == "generation"
    assert selection.active is None
    with pytest.raises(ValueError, match="plugin 'gen'; known plugins: comprehension, generation"):
        with controller.use(["comprehension", "gen"]):
            pass
    with pytest.raises(ValueError, match="2 entries but the input has 3 samples"):
        with controller.use(["comprehension", "generation"]):
            model(torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown H-LoRA plugin"):
        controller.parameters_of("segmentation")


def test_injection_targets_errors_and_added_plugins() -> None:
    model = tiny_phi3()
    controller = inject_hlora(model, PLUGINS, exclude=("lm_head", "down_proj"))
    assert {p.rsplit(".", 1)[-1] for p in controller.layers} == PHI3_TARGETS - {"down_proj"}
    with pytest.raises(ValueError, match="already has H-LoRA layers"):
        inject_hlora(model, PLUGINS)
    controller.add_plugin("segmentation", PluginConfig(rank=4, alpha=8, num_experts=2))
    assert controller.plugin_names == ("comprehension", "generation", "segmentation")
    assert all(layer.plugins["segmentation"].rank == 4 for layer in controller.layers.values())
    with pytest.raises(ValueError, match="already exists"):
        controller.add_plugin("generation", PluginConfig(rank=4, alpha=8))

    with pytest.raises(ValueError, match="matched no module of Phi3ForCausalLM: q_proj"):
        inject_hlora(tiny_phi3(), PLUGINS, targets=["q_proj", "o_proj"])
    with pytest.raises(ValueError, match=r"'mlp' matches non-Linear modules: model\.layers\.0\.mlp \(Phi3"):
        inject_hlora(tiny_phi3(), PLUGINS, targets=["mlp"])
    only_qkv = inject_hlora(tiny_phi3(), PLUGINS, targets=["self_attn.qkv_proj"])
    assert list(only_qkv.layers) == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]


def test_plugins_are_initialised_once_or_not_at_all_for_loading():
    """Training init draws A then the router from Kaiming-uniform(a=sqrt 5) exactly once, B is zero; `init=False`
    (a loader fills the weights next) allocates without drawing anything."""
    torch.manual_seed(0)
    plugin = HLoRAPlugin(32, 48, 8, 16, 4)
    after_plugin = torch.rand(1)
    torch.manual_seed(0)
    a, route = torch.empty(8, 32), torch.empty(4, 32)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    torch.nn.init.kaiming_uniform_(route, a=math.sqrt(5))
    assert torch.equal(plugin.lora_A.weight, a) and torch.equal(plugin.lora_route.weight, route)
    assert torch.count_nonzero(plugin.lora_B.weight) == 0
    assert torch.equal(torch.rand(1), after_plugin)  # nothing else was drawn
    torch.manual_seed(0)
    first_draw = torch.rand(1)
    torch.manual_seed(0)
    empty = HLoRAPlugin(32, 48, 8, 16, 4, init=False)
    assert empty.lora_A.weight.shape == (8, 32) and empty.lora_A.weight.device.type == "cpu"
    assert torch.equal(torch.rand(1), first_draw)  # building it drew no random numbers
