"""Peak resident memory and seconds to load a random-weight HealthGPT-M3 (bf16): official layout vs our bundle.

Files are made once under `--dir` (M3 shapes; `--scale` keeps that fraction of the LLM's and CLIP's layers):
a Phi-3-mini-shaped base (bf16 safetensors shards, a 32,011-token tokenizer), a ViT-L/14-336-shaped CLIP (fp32, as
openai's), the three official `.bin` files (fp16, official keys) and a taming VQGAN `last.ckpt` + `model.yaml`;
then the bundles (base by reference, base included). Each load runs in a fresh subprocess that first reads its
layout's files once (warm page cache), then reports its peak RSS (`resource.getrusage`), the seconds until
`from_pretrained` returns, the seconds until every weight was read once (loaders memory-map: pages arrive on first
touch) and the process CPU seconds of both, which other jobs on a shared machine disturb less than wall time.

    python bench/load.py --scale 0.25      # 8 LLM layers
    python bench/load.py                   # full size, about 21 GB of files
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from healthgpt.api import HealthGPT
from healthgpt.checkpoints import EMBED_KEY, HEAD_KEY, convert_official, official_plugin_parameters
from healthgpt.config import COMPREHENSION, GENERATION, HealthGPTConfig, get_variant
from healthgpt.model import build_model
from healthgpt.vision import ImagePreprocessor, VisionEncoder
from healthgpt.vqgan import VQGAN

PHI3_ADDED = ("<|endoftext|>", "<|assistant|>", *(f"<|placeholder{i}|>" for i in range(1, 5)), "<|system|>", "<|end|>",
              "<|placeholder5|>", "<|placeholder6|>", "<|user|>")  # fmt: skip
SHARD_BYTES = 2 * 1024**3
MODES = {"official": None, "bundle-ref": False, "bundle-inc": True}  # layout -> include_base of its bundle
LABELS = {"official": "official files", "bundle-ref": "bundle, base by reference", "bundle-inc": "bundle, base inside"}


def config_for(scale: float) -> HealthGPTConfig:
    """M3 with `scale` of its LLM and CLIP layers, loaded in bf16."""
    m3 = get_variant("m3")
    llm = dataclasses.replace(m3.llm, num_layers=max(1, round(m3.llm.num_layers * scale)))
    vision = dataclasses.replace(m3.vision, num_layers=max(2, round(m3.vision.num_layers * scale)))
    return m3.replace(llm=llm, vision=vision, dtype="bfloat16")


def phi3_config(config: HealthGPTConfig) -> Phi3Config:
    c = config.llm
    return Phi3Config(
        vocab_size=c.vocab_rows, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=32000, pad_token_id=32000, dtype="bfloat16",
    )  # fmt: skip


def write_tokenizer(folder: Path) -> None:
    """A 32,000-word tokenizer plus Phi-3's 11 added tokens: 32,011 ids, as Phi-3-mini's (content is irrelevant)."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 32000)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", unk_token="<unk>", eos_token="<|endoftext|>")
    tok.add_tokens(list(PHI3_ADDED), special_tokens=True)
    tok.pad_token = "<|endoftext|>"
    tok.save_pretrained(folder)


def write_base(config: HealthGPTConfig, folder: Path, seed: int = 0) -> None:
    """Random bf16 Phi-3 weights written shard by shard (never the whole model in memory), with the HF index."""
    folder.mkdir(parents=True)
    hf = phi3_config(config)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Phi3ForCausalLM(hf).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    weight_map, shard, size, index = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    for key, shape in shapes.items():
        tensor = torch.empty(shape, dtype=torch.bfloat16)
        tensor.normal_(1.0 if key.endswith("norm.weight") else 0.0, 0.02, generator=g)
        shard[key] = tensor
        size += tensor.nbytes
        if size >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    hf.save_pretrained(folder)
    write_tokenizer(folder)


def clip_config(config: HealthGPTConfig) -> CLIPVisionConfig:
    v = config.vision
    return CLIPVisionConfig(
        image_size=v.image_size, patch_size=v.patch_size, hidden_size=v.hidden_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, intermediate_size=v.intermediate_size, projection_dim=768,
        hidden_act="quick_gelu",
    )  # fmt: skip


def write_clip(config: HealthGPTConfig, folder: Path) -> None:
    v = config.vision
    CLIPVisionModel(clip_config(config)).save_pretrained(folder)  # fp32, as openai/clip-vit-large-patch14-336
    ImagePreprocessor.for_clip(v.image_size, v.image_mean, v.image_std).processor.save_pretrained(folder)


def write_official_files(config: HealthGPTConfig, base: Path, root: Path) -> None:
    """fp16 `.bin` files with the official keys and shapes, read off a meta-device model of the config."""
    from transformers import AutoTokenizer

    with torch.device("meta"):
        llm = Phi3ForCausalLM(phi3_config(config))
        vision = VisionEncoder(CLIPVisionModel(clip_config(config)))
        model = build_model(config, llm, vision, AutoTokenizer.from_pretrained(base))
    g = torch.Generator().manual_seed(1)

    def random(shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
        return {k: torch.empty(s, dtype=torch.float16).normal_(0.0, 0.02, generator=g) for k, s in shapes.items()}

    for plugin in (COMPREHENSION, GENERATION):
        shapes = {k: v.shape for k, v in official_plugin_parameters(model, plugin).items()}
        torch.save(random(shapes), root / config.official_files[plugin])
    rows = model.llm.get_input_embeddings().weight.shape
    torch.save(random({EMBED_KEY: rows, HEAD_KEY: rows}), root / config.official_files["fusion"])


def write_vqgan(config: HealthGPTConfig, folder: Path) -> None:
    """taming's Lightning layout: `last.ckpt` with a `state_dict`, and `model.yaml`."""
    folder.mkdir()
    vq = config.vq
    torch.save({"state_dict": VQGAN.from_config(vq).state_dict()}, folder / "last.ckpt")
    ddconfig = dict(double_z=False, z_channels=vq.z_channels, resolution=vq.image_size, in_channels=3, out_ch=3,
                    ch=vq.ch, ch_mult=list(vq.ch_mult), num_res_blocks=vq.num_res_blocks,
                    attn_resolutions=list(vq.attn_resolutions), dropout=0.0)  # fmt: skip
    params = dict(kl_weight=1e-8, embed_dim=vq.embed_dim, n_embed=vq.num_codes, ddconfig=ddconfig)
    model = {"target": "taming.models.vqgan.GumbelVQ", "params": params}
    (folder / "model.yaml").write_text(yaml.safe_dump({"model": model}))


def official_kwargs(config: HealthGPTConfig, root: Path) -> dict:
    return dict(
        variant=config, base_model=root / "base", vision_tower=root / "clip", vqgan=root / "vqgan", dtype="bfloat16",
        plugin_files={p: root / config.official_files[p] for p in (COMPREHENSION, GENERATION)},
        fusion_file=root / config.official_files["fusion"],
    )  # fmt: skip


def prepare(config: HealthGPTConfig, root: Path, layouts: list[str]) -> None:
    """Write whatever is missing: base, CLIP, official files, VQGAN, then the bundles of `layouts`."""
    kw = official_kwargs(config, root)
    steps = [
        ("base", lambda: write_base(config, root / "base")),
        ("clip", lambda: write_clip(config, root / "clip")),
        (config.official_files["fusion"], lambda: write_official_files(config, root / "base", root)),
        ("vqgan", lambda: write_vqgan(config, root / "vqgan")),
    ]
    steps += [
        (layout, lambda layout=layout: convert_official(root / layout, include_base=MODES[layout], **kw))
        for layout in layouts
        if MODES[layout] is not None
    ]
    root.mkdir(parents=True, exist_ok=True)
    for name, make in steps:
        if not (root / name).exists():
            start = time.perf_counter()
            print(f"writing {root / name} ...", file=sys.stderr, flush=True)
            make()
            print(f"  {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)


def layout_files(mode: str, root: Path) -> list[Path]:
    """Every file a layout's load reads."""
    parts = {"official": ["base", "clip", "vqgan", "*.bin"], "bundle-ref": ["bundle-ref", "base", "clip"]}
    paths = [p for part in parts.get(mode, [mode]) for p in root.glob(part)]
    return [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]


def warm(files: list[Path]) -> None:
    """Read the files once into the page cache (through one small buffer, so this process's RSS stays put)."""
    buffer = bytearray(64 * 1024**2)
    for path in files:
        with path.open("rb", buffering=0) as f:
            while f.readinto(buffer):
                pass


def child(mode: str, scale: float, root: Path) -> None:
    """Load once in this process (files warm in the page cache) and print one JSON line of figures."""
    config = config_for(scale)
    warm(layout_files(mode, root))
    cpu = time.process_time()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes; torch + transformers
    start = time.perf_counter()
    if mode == "official":
        model = HealthGPT.from_pretrained(**official_kwargs(config, root))
    else:
        model = HealthGPT.from_pretrained(root / mode)
    loaded = time.perf_counter() - start
    tensors = [*model.model.parameters(), *model.model.buffers(), *model.vqgan.parameters()]
    checksum = sum(float(torch.sum(t, dtype=torch.float32)) for t in tensors if t.is_floating_point())
    touched = time.perf_counter() - start
    cpu = time.process_time() - cpu
    weight_bytes = sum(t.nbytes for t in tensors)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    figures = dict(load_s=loaded, touched_s=touched, cpu_s=cpu, before=before, peak=peak, weights=weight_bytes)
    figures |= dict(sum=checksum, file_bytes=sum(f.stat().st_size for f in layout_files(mode, root)))
    print(json.dumps(dict(mode=mode, **figures)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of M3's LLM and CLIP layers to keep")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/healthgpt-bench-load"), help="where the files go")
    parser.add_argument("--repeats", type=int, default=2, help="fresh-process loads per layout (interleaved)")
    parser.add_argument("--layouts", nargs="+", choices=list(MODES), default=list(MODES), help="what to load")
    parser.add_argument("--child", choices=["prepare", *MODES], help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.dir / f"scale-{args.scale:g}"
    config = config_for(args.scale)
    if args.child == "prepare":
        prepare(config, root, args.layouts)
    elif args.child:
        child(args.child, args.scale, root)
    else:
        measure(args, config)


def measure(args: argparse.Namespace, config: HealthGPTConfig) -> None:
    """Prepare the files, then load each layout in fresh processes. Every step is a subprocess, so this process stays
    small: Linux hands a parent's peak RSS down to the children it forks, which would mask theirs."""
    common = [sys.executable, __file__, "--scale", str(args.scale), "--dir", str(args.dir)]
    subprocess.run([*common, "--layouts", *args.layouts, "--child", "prepare"], check=True)
    results: dict[str, list[dict]] = {m: [] for m in args.layouts}
    for _ in range(args.repeats):
        for mode in args.layouts:
            out = subprocess.run([*common, "--child", mode], check=True, capture_output=True, text=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
    sums = {r["sum"] for rs in results.values() for r in rs}
    print(f"M3 shape, {config.llm.num_layers} LLM layers, {config.vision.num_layers} CLIP layers, bf16; "
          f"{args.repeats} fresh processes per layout (times: best; peak: worst); "
          f"same weights in every layout: {len(sums) == 1}")  # fmt: skip
    print("peak RSS / weights: of the whole process; (peak - RSS before loading) / weights: of the loading alone")
    header = ("layout", "files GB", "weights GB", "peak RSS GB", "peak/weights", "(peak-before)/w", "load s",
              "resident s", "CPU s")  # fmt: skip
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for mode, rs in results.items():
        peak, before, weights = max(r["peak"] for r in rs), min(r["before"] for r in rs), rs[0]["weights"]
        times = [min(r[k] for r in rs) for k in ("load_s", "touched_s", "cpu_s")]
        row = (LABELS[mode], f"{rs[0]['file_bytes'] / 1e9:.2f}", f"{weights / 1e9:.2f}", f"{peak / 1e9:.2f}",
               f"{peak / weights:.2f}", f"{(peak - before) / weights:.2f}", *(f"{t:.1f}" for t in times))  # fmt: skip
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
