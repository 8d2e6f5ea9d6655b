"""Tiny official HealthGPT releases written by hand for the loading tests: base LLM and CLIP folders of each variant's
architecture at nano sizes, and H-LoRA, projector and fusion files in the published key layout and dtype (fp16),
from a spec written here after REFERENCE §2.3/§2.4, not from our module paths; and the base model with those tensors
assigned by hand, which gives the expected logits."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from _tokenizers import build_bpe_chat_tokenizer, build_sentencepiece_phi3_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from healthgpt.config import COMPREHENSION, GENERATION, HealthGPTConfig, LLMConfig, PluginConfig, get_variant
from healthgpt.model import HealthGPTModel, build_model, expand_image_slots
from healthgpt.nano import random_llm, random_vision
from healthgpt.templates import get_template
from healthgpt.tokens import IMAGE_TOKEN_INDEX
from healthgpt.vision import ImagePreprocessor, VisionEncoder

P = "base_model.model."
TOKENIZERS = {"m3": "sentencepiece", "l14": "phi4", "xl32": "qwen"}
KV_HEADS = {"m3": 4, "l14": 2, "xl32": 2}  # Phi-3-mini is MHA; Phi-4 and Qwen2.5 use GQA
RANKS = {COMPREHENSION: (8, 16.0), GENERATION: (16, 32.0)}


@dataclasses.dataclass
class Case:
    config: HealthGPTConfig
    base: Path
    clip: Path
    files: dict[str, Path]  # plugin name or "fusion" -> official file
    tensors: dict[str, dict[str, torch.Tensor]]


def _tokenizer(folder: Path, kind: str) -> int:
    if kind == "sentencepiece":
        build_sentencepiece_phi3_tokenizer(folder)
    else:
        build_bpe_chat_tokenizer(folder, style=kind)
    return len(AutoTokenizer.from_pretrained(folder))


def tiny_config(name: str, vocab_rows: int) -> HealthGPTConfig:
    """The variant with nano sizes; sources, template, official file names and Hub id kept."""
    variant, nano = get_variant(name), get_variant("nano")
    llm = dataclasses.replace(
        variant.llm, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=KV_HEADS[name],
        intermediate_size=128, vocab_rows=vocab_rows, max_position_embeddings=1024,
    )  # fmt: skip
    plugins = {p: PluginConfig(*RANKS[p], vision_layer=c.vision_layer) for p, c in variant.plugins.items()}
    vision = dataclasses.replace(nano.vision, source=variant.vision.source)
    return variant.replace(llm=llm, vision=vision, plugins=plugins, vq=nano.vq, dtype="float32")


def lora_shapes(llm: LLMConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every adapted linear under `model.layers.{i}.` (REFERENCE §2.3)."""
    h, i = llm.hidden_size, llm.intermediate_size
    q = h
    kv = llm.num_kv_heads * (h // llm.num_heads)
    if llm.arch == "phi3":
        return {"self_attn.qkv_proj": (h, q + 2 * kv), "self_attn.o_proj": (q, h),
                "mlp.gate_up_proj": (h, 2 * i), "mlp.down_proj": (i, h)}  # fmt: skip
    return {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
            "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h)}  # fmt: skip


def official_plugin(llm: LLMConfig, vision_hidden: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """An H-LoRA + projector file in the published layout: fp16, keys from the PeftModel root."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.05) -> torch.Tensor:
        return (torch.randn(shape, generator=g) * std).half()

    out = {}
    for i in range(llm.num_layers):
        for module, (fan_in, fan_out) in lora_shapes(llm).items():
            key = f"{P}model.layers.{i}.{module}."
            out[key + "lora_A.weight"] = rand(rank, fan_in)
            out[key + "lora_B.weight"] = rand(fan_out, rank)
            out[key + "lora_route.weight"] = rand(4, fan_in, std=0.3)
    h = llm.hidden_size
    out |= {f"{P}model.mm_projector.0.weight": rand(h, vision_hidden), f"{P}model.mm_projector.0.bias": rand(h),
            f"{P}model.mm_projector.2.weight": rand(h, h), f"{P}model.mm_projector.2.bias": rand(h)}  # fmt: skip
    return out


def make_case(root: Path, name: str) -> Case:
    base, clip = root / "base", root / "clip"
    length = _tokenizer(base, TOKENIZERS[name])
    config = tiny_config(name, vocab_rows=length + 53 if name != "l14" else length)  # padding rows as Phi-3/Qwen
    tokenizer = AutoTokenizer.from_pretrained(base)
    stops = tokenizer.convert_tokens_to_ids(list(get_template(config.template).stop_strings))
    random_llm(config.llm, config.llm.vocab_rows, seed=1, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)\
        .save_pretrained(base)  # fmt: skip
    random_vision(config.vision, seed=2).tower.save_pretrained(clip)
    v = config.vision
    ImagePreprocessor.for_clip(v.image_size, v.image_mean, v.image_std).processor.save_pretrained(clip)
    tensors = {
        plugin: official_plugin(config.llm, v.hidden_size, cfg.rank, seed=10 + i)
        for i, (plugin, cfg) in enumerate(config.plugins.items())
    }
    if config.add_image_tokens:
        rows = length + config.vq.num_codes + 3  # the published resize: tokenizer length + 8,195 (here codes + 3)
        g = torch.Generator().manual_seed(5)
        tensors["fusion"] = {
            f"{P}model.embed_tokens.weight": torch.randn(rows, 64, generator=g).half(),
            f"{P}lm_head.weight": torch.randn(rows, 64, generator=g).half(),
        }
    files = {}
    for key, state in tensors.items():
        files[key] = root / (config.official_files.get(key) or f"{key}.bin")
        torch.save(state, files[key])
    return Case(config, base, clip, files, tensors)


def hand_model(case: Case, fusion_everywhere: bool = False) -> HealthGPTModel:
    """The base model with every plugin's official tensors assigned to its modules by hand (and the fusion tables
    copied over the embedding and head when `fusion_everywhere`, as the published generation model has them)."""
    config = case.config
    plugins = list(config.plugins)
    llm = AutoModelForCausalLM.from_pretrained(case.base, dtype=torch.float32)
    vision = VisionEncoder(CLIPVisionModel.from_pretrained(case.clip))
    model = build_model(config, llm, vision, AutoTokenizer.from_pretrained(case.base))
    with torch.no_grad():
        for plugin in plugins:
            state = case.tensors[plugin]
            for i, layer in enumerate(model.llm.model.layers):
                for module in lora_shapes(case.config.llm):
                    wrapped = layer.get_submodule(module).plugins[plugin]
                    for part in ("lora_A", "lora_B", "lora_route"):
                        getattr(wrapped, part).weight.copy_(state[f"{P}model.layers.{i}.{module}.{part}.weight"])
            for index in (0, 2):
                for field in ("weight", "bias"):
                    value = state[f"{P}model.mm_projector.{index}.{field}"]
                    getattr(model.projectors[plugin][index], field).copy_(value)
        if fusion_everywhere:
            fusion = case.tensors["fusion"]
            model.llm.get_input_embeddings().weight.copy_(fusion[f"{P}model.embed_tokens.weight"])
            model.llm.get_output_embeddings().weight.copy_(fusion[f"{P}lm_head.weight"])
    return model.eval()


def logits(model: HealthGPTModel, plugins: str | list[str], batch: int = 1) -> torch.Tensor:
    """Logits of a fixed prompt with one image (and a VQ code token when the model has image tokens)."""
    g = torch.Generator().manual_seed(3)
    text = [5, 17, 42, IMAGE_TOKEN_INDEX, 7, 99]
    if model.image_vocab is not None:
        text += [model.image_vocab.start_id, model.image_vocab.first_code_id + 3]
    ids = torch.tensor([expand_image_slots(text, model.num_patches)] * batch)
    size = model.vision.tower.config.image_size
    pixels = torch.randn(1, 3, size, size, generator=g).repeat(batch, 1, 1, 1)
    with torch.no_grad():
        return model(ids, plugins=plugins, pixel_values=pixels).logits
