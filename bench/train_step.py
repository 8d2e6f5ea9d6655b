"""One stage-3 training step of a small Phi-3 HealthGPT: H-LoRA vs plain LoRA of the same rank (peft) vs a naive
MoE-LoRA, each with and without gradient checkpointing, side by side in one run.

The step is what stage 3 runs: projected image features (a trainable `mlp2x_gelu` projector over fixed CLIP
features) spliced before the text, the frozen LLM with adapters on every linear but `lm_head`, the loss on the
text, backward, AdamW on adapters + projector. The three LLMs share one set of base weights. Reported per
method: samples/s (median over repeats, after one warm-up; process CPU time on one thread by default, since
wall time on a shared box measures the neighbours), the ratio to LoRA, and memory: the activations kept for
backward (measured with saved-tensor hooks, storage counted once) and, on CUDA, the peak allocated.
Run: `python bench/train_step.py` (a few minutes on 2 quiet CPU cores; `--device cuda` on a GPU).
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from _shared import NaiveMoELoRA, measure_memory, time_rotated
from peft import LoraConfig, get_peft_model
from torch import Tensor, nn

from healthgpt.config import LLMConfig, PluginConfig
from healthgpt.hlora import inject_hlora
from healthgpt.nano import random_llm
from healthgpt.vision import build_projector

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def with_moelora(llm: nn.Module, rank: int, alpha: float, experts: int) -> nn.Module:
    llm.requires_grad_(False)
    for path, module in list(llm.named_modules()):
        if isinstance(module, nn.Linear) and path.rsplit(".", 1)[-1] in TARGETS:
            parent, _, child = path.rpartition(".")
            setattr(llm.get_submodule(parent), child, NaiveMoELoRA(module, rank, alpha, experts))
    return llm


def with_hlora(llm: nn.Module, rank: int, alpha: float, experts: int) -> nn.Module:
    controller = inject_hlora(llm, {"comprehension": PluginConfig(rank=rank, alpha=alpha, num_experts=experts)})
    llm.requires_grad_(False)
    for p in controller.parameters_of("comprehension"):
        p.requires_grad_(True)
    controller.selection.set("comprehension")
    return llm


def with_lora(llm: nn.Module, rank: int, alpha: float, experts: int) -> nn.Module:
    return get_peft_model(llm, LoraConfig(r=rank, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0))


class Step:
    """One method's model, projector and optimizer; `__call__` runs a training step on a fixed batch."""

    def __init__(self, llm: nn.Module, hidden: int, features: Tensor, ids: Tensor, checkpointing: bool) -> None:
        self.llm = llm
        self.projector = build_projector(features.shape[-1], hidden).to(features.device)
        self.features, self.ids = features, ids
        core = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
        self.embed = core.get_input_embeddings()
        if checkpointing:
            core.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        core.config.use_cache = False
        llm.train()
        params = [p for p in [*llm.parameters(), *self.projector.parameters()] if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        image = torch.full((ids.shape[0], features.shape[1]), -100, device=ids.device)
        self.labels = torch.cat([image, ids], dim=1)  # loss on the text only

    def __call__(self) -> None:
        embeds = torch.cat([self.projector(self.features), self.embed(self.ids)], dim=1)  # [B, P + T, H]
        loss = self.llm(inputs_embeds=embeds, labels=self.labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--text", type=int, default=192, help="text tokens per sample")
    parser.add_argument("--patches", type=int, default=64, help="image slots per sample")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--device", default="cpu")
    return parser.parse_args()


def build_steps(args: argparse.Namespace, device: torch.device) -> dict[tuple[str, bool], Step]:
    """One training step per (method, checkpointing) on copies of the same random Phi-3 base and batch."""
    config = LLMConfig(
        arch="phi3",
        source="bench",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.heads,
        intermediate_size=args.hidden * 8 // 3,
        vocab_rows=args.vocab,
    )
    base = random_llm(config, args.vocab, seed=0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.text), generator=g).to(device)
    features = torch.randn(args.batch, args.patches, 64, generator=g).to(device)  # fixed "CLIP" features
    alpha = 2.0 * args.rank
    wrappers: dict[str, Callable[[nn.Module, int, float, int], nn.Module]] = {
        "LoRA (peft)": with_lora,
        f"H-LoRA k={args.experts}": with_hlora,
        f"MoE-LoRA k={args.experts}": with_moelora,
    }
    steps: dict[tuple[str, bool], Step] = {}
    for name, wrap in wrappers.items():
        for ckpt in (False, True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(1)
                llm = wrap(copy.deepcopy(base), args.rank, alpha, args.experts).to(device)
                steps[name, ckpt] = Step(llm, args.hidden, features, ids, ckpt)
    return steps


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    steps = build_steps(args, device)
    memory = {key: measure_memory(step, device) for key, step in steps.items()}  # also the warm-up
    times = time_rotated(steps, args.repeats, args.clock, device)
    tokens = args.batch * (args.patches + args.text)
    print(
        f"torch {torch.__version__}, {device}, {torch.get_num_threads()} thread(s), {args.clock} time; Phi-3 "
        f"H={args.hidden} x {args.layers} layers, batch {args.batch} x {tokens // args.batch} tokens "
        f"({args.patches} image slots), rank {args.rank}, median of {args.repeats} steps after 1 warm-up"
    )
    print(
        f"{'method':18s} {'ckpt':>5s} {'samples/s':>10s} {'time x LoRA':>12s} {'activations MiB':>16s} {'CUDA MiB':>9s}"
    )
    for (name, ckpt), t in times.items():
        median, lora = statistics.median(t), statistics.median(times["LoRA (peft)", ckpt])
        saved, peak = memory[name, ckpt]
        peak_text = f"{peak:9.0f}" if peak is not None else f"{'-':>9s}"
        ckpt_text = "on" if ckpt else "off"
        print(f"{name:18s} {ckpt_text:>5s} {args.batch / median:10.2f} {median / lora:12.3f} {saved:16.1f} {peak_text}")


if __name__ == "__main__":
    main()
