"""The training loss with the head applied only where a token is supervised (`HealthGPTModel.forward` with labels)
against transformers' `labels=` path, which computes float32 logits at every position: one forward and backward of
a stage-3 micro-batch of each kind, side by side in one run, from the same random model and batch.

Comprehension rows: the image's slots, a question and a short answer (a few supervised tokens in about 300);
generation rows: a source image's slots, the instruction, then the target's image codes and the reply, all
supervised. The stage-3 parameters train (the plugin and its projector). Reported per kind and path: milliseconds
per step (median over repeats after one warm-up, the order rotated each round; process CPU time on one thread by
default, since wall time on a shared box measures the neighbours), the ratio to the every-position path, the
activations autograd keeps (saved-tensor hooks; with `--checkpointing` the
decoder layers' are recomputed instead) and, on CUDA, the peak allocated.
Run: `python bench/supervised_head.py` (mini's shapes, about a minute on one CPU core); on a GPU
`python bench/supervised_head.py --variant m3 --device cuda --dtype bfloat16 --clock wall`.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch
from _shared import build_on_device, measure_memory, time_rotated

from healthgpt.api import HealthGPT
from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="mini", help="a variant name (mini, m3, ...) or 'small'")
    parser.add_argument("--batch", type=int, default=8, help="rows per micro-batch (mini's recipe: 8)")
    parser.add_argument("--question", type=int, default=24, help="prompt text tokens per row")
    parser.add_argument("--answer", type=int, default=4, help="supervised tokens of a comprehension row")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--checkpointing", action="store_true", help="recompute each decoder layer in backward")
    return parser.parse_args()


def batch(model: HealthGPT, args: argparse.Namespace, kind: str, device: torch.device) -> dict[str, torch.Tensor]:
    """Random ids of one kind's rows: image slots, prompt text, then the supervised tail (an answer, or the image
    codes and a reply)."""
    core, g = model.model, torch.Generator().manual_seed(0)
    supervised = args.answer if kind == COMPREHENSION else core.image_span_length + 2
    text = torch.randint(0, core.llm.get_input_embeddings().num_embeddings, (args.batch, args.question + supervised))
    slots = torch.full((args.batch, core.num_patches), IMAGE_TOKEN_INDEX)
    ids = torch.cat([slots, text], dim=1)
    labels = ids.clone()
    labels[:, :-supervised] = IGNORE_INDEX
    size = model.config.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=g)
    return {"input_ids": ids.to(device), "labels": labels.to(device), "pixel_values": pixels.to(device)}


def step(model: HealthGPT, plugin: str, b: dict[str, torch.Tensor], ours: bool) -> Callable[[], None]:
    """A forward and backward of the batch through our path or the every-position one (the same loss)."""
    core = model.model
    plugins = [plugin] * b["input_ids"].shape[0]
    n = int((b["labels"] != IGNORE_INDEX).sum())

    def run() -> None:
        with core.hlora.use(plugins):  # backward too: checkpointed layers recompute with the same plugins
            if ours:
                loss = core(b["input_ids"], plugins, pixel_values=b["pixel_values"], labels=b["labels"],
                            num_items_in_batch=n, use_cache=False).loss  # fmt: skip
            else:
                embeds = core.embed(b["input_ids"], b["pixel_values"], plugins)
                loss = core.llm(inputs_embeds=embeds, labels=b["labels"], num_items_in_batch=n, use_cache=False).loss
            loss.backward()
        core.zero_grad(set_to_none=True)

    return run


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_on_device(args.variant, device, args.dtype)
    core = model.model
    core.requires_grad_(False)
    for plugin in (COMPREHENSION, GENERATION):
        for p in [*core.projectors[plugin].parameters(), *core.hlora.parameters_of(plugin)]:
            p.requires_grad_(True)
    if args.checkpointing:
        core.llm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    core.train()
    steps = {}
    for plugin in (COMPREHENSION, GENERATION):
        b = batch(model, args, plugin, device)
        for ours in (True, False):
            steps[plugin, ours] = step(model, plugin, b, ours)

    memory = {key: measure_memory(run, device) for key, run in steps.items()}  # also the warm-up
    times = time_rotated(steps, args.repeats, args.clock, device)

    vocab = core.llm.get_output_embeddings().weight.shape[0]
    print(
        f"torch {torch.__version__}, {device}, {args.dtype}, {torch.get_num_threads()} thread(s), {args.clock} time; "
        f"{args.variant}: LLM H={core.llm.config.hidden_size} x {core.llm.config.num_hidden_layers} layers, vocab "
        f"{vocab}; batch {args.batch}, {core.num_patches} image slots a row; checkpointing "
        f"{'on' if args.checkpointing else 'off'}; median of {args.repeats} steps"
    )
    print(f"{'kind':14s} {'head at':22s} {'ms/step':>9s} {'time ratio':>11s} {'activations MiB':>16s} {'CUDA MiB':>9s}")
    for (plugin, ours), t in times.items():
        median, full = statistics.median(t), statistics.median(times[plugin, False])
        kept, peak = memory[plugin, ours]
        where = "supervised tokens" if ours else "every position"
        peak_text = f"{peak:9.0f}" if peak is not None else f"{'-':>9s}"
        print(f"{plugin:14s} {where:22s} {1000 * median:9.1f} {median / full:11.3f} {kept:16.1f} {peak_text}")


if __name__ == "__main__":
    main()
