"""The unified HealthGPT model: a transformers causal LM with H-LoRA plugins, a CLIP tower read at two depths,
one projector per plugin, and VQ image codes in the vocabulary.

Composition, not subclassing: the HF model, the vision encoder and the projectors are members. Image slots in the
token ids (`IMAGE_TOKEN_INDEX`, one per visual patch) are filled by a masked scatter after a count check.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from healthgpt.errors import HealthGPTError

from .config import HealthGPTConfig
from .feature_cache import FeatureCache
from .hlora import HLoRAController, inject_hlora
from .tokens import IGNORE_INDEX, IMAGE_TOKEN_INDEX, ImageVocab, add_image_tokens
from .vision import VisionEncoder, build_projector, project_images


class ImageSlotError(HealthGPTError):
    """The prompt's image placeholders and the images given do not match."""


def expand_image_slots(ids: Sequence[int], num_patches: int) -> list[int]:
    """Replace each `IMAGE_TOKEN_INDEX` sentinel by `num_patches` slots, so sequence lengths are final before
    batching (the published code splices features in instead; the resulting embeddings are the same)."""
    out: list[int] = []
    for i in ids:
        out.extend([IMAGE_TOKEN_INDEX] * num_patches if i == IMAGE_TOKEN_INDEX else [i])
    return out


def attach_image_vocab(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, num_codes: int) -> ImageVocab:
    """Add the image tokens (REFERENCE §1.6), resize embeddings and head to the tokenizer, and set every row from the
    first new id on to the mean of the rows before it (as the published loader does, padding rows included)."""
    vocab = add_image_tokens(tokenizer, num_codes)
    first_new = vocab.start_id
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for weight in (llm.get_input_embeddings().weight, llm.get_output_embeddings().weight):
            weight[first_new:] = _row_mean(weight[:first_new]).to(weight.dtype)
    return vocab


def _row_mean(rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Mean of the rows accumulated in fp32 chunk by chunk, without an fp32 copy of the whole table."""
    total = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
    for start in range(0, rows.shape[0], chunk):
        total += rows[start : start + chunk].sum(dim=0, dtype=torch.float32)
    return total / rows.shape[0]


class HealthGPTModel(nn.Module):
    """LLM + vision + per-plugin projectors; `forward` gives logits and the loss on response tokens only."""

    def __init__(
        self,
        llm: PreTrainedModel,
        hlora: HLoRAController,
        vision: VisionEncoder,
        projectors: Mapping[str, nn.Module],
        vision_layers: Mapping[str, int],
        image_vocab: ImageVocab | None,
        num_patches: int,
        image_span_length: int | None = None,
    ) -> None:
        super().__init__()
        self.llm = llm
        self.hlora = hlora
        self.vision = vision
        self.projectors = nn.ModuleDict(dict(projectors))
        self.vision_layers = dict(vision_layers)
        self.image_vocab = image_vocab
        self.num_patches = num_patches
        self.image_span_length = image_span_length if image_vocab is not None else None  # codes per generated image
        self.feature_cache = FeatureCache()  # in eval mode without gradients; emptied whenever weights may change

    @property
    def plugin_names(self) -> tuple[str, ...]:
        return tuple(self.projectors)

    def own_vision_layers(self, plugin: str) -> list[nn.Module]:
        """The tower's encoder layers whose output only `plugin` reads: those above the deepest layer another plugin
        reads, up to its own. Training them changes no other plugin's image features."""
        depth = self.vision.depth
        others = [depth(layer) for name, layer in self.vision_layers.items() if name != plugin]
        return self.vision.encoder_layers(max(others, default=0), depth(self.vision_layers[plugin]))

    def check_plugins(self, plugins: str | Sequence[str], batch: int) -> list[str]:
        """One plugin name per sample, validated."""
        names = [plugins] * batch if isinstance(plugins, str) else list(plugins)
        if len(names) != batch:
            raise ValueError(f"{batch} samples but {len(names)} plugin names")
        unknown = sorted(set(names) - set(self.plugin_names))
        if unknown:
            raise ValueError(f"unknown plugin(s) {unknown}; this model has {list(self.plugin_names)}")
        return names

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, plugins: Sequence[str]) -> torch.Tensor:
        """Token embeddings [B,T,H] with every image slot replaced by its image's projected patch features."""
        slots = input_ids == IMAGE_TOKEN_INDEX  # [B,T]
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))  # [B,T,H]
        per_row = slots.sum(dim=1).tolist()
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        if any(n % self.num_patches for n in per_row) or sum(per_row) != n_images * self.num_patches:
            raise ImageSlotError(
                f"the prompt has {sum(per_row) / self.num_patches:g} image slot(s) "
                f"({sum(per_row)} positions, {self.num_patches} per image) but {n_images} image(s) were given; "
                "put one '<image>' in the question's turn per image (healthgpt.templates.user_content does this)"
            )
        if n_images == 0:
            return embeds
        image_plugins = [p for p, n in zip(plugins, per_row, strict=True) for _ in range(n // self.num_patches)]
        if self.training or torch.is_grad_enabled():
            feats = self._project(pixel_values, image_plugins)
        else:
            feats = self.feature_cache.features(pixel_values, image_plugins, self._project)
        return embeds.masked_scatter(slots.unsqueeze(-1), feats.to(embeds.dtype))

    def train(self, mode: bool = True) -> HealthGPTModel:
        """Switch mode; the feature cache is emptied, since training changes the weights behind it."""
        self.feature_cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # nn.Module's hook behind .to(), .half(), .cuda(): features change too
        self.feature_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _project(self, pixel_values: torch.Tensor, plugins: Sequence[str]) -> torch.Tensor:
        return project_images(self.vision, self.projectors, self.vision_layers, pixel_values, plugins)

    def forward(
        self,
        input_ids: torch.Tensor,
        plugins: str | Sequence[str],
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **llm_kwargs,
    ):
        """Causal-LM output of the HF model (`.logits`, `.loss` when `labels` are given, `.cache`).

        `labels` use `IGNORE_INDEX` (-100) on prompt and image positions, so the loss covers response tokens only.
        With `labels`, `.logits` holds only what the loss reads: per row, its supervised positions in order, rows with
        fewer padded with unsupervised ones ([batch, most supervised tokens in a row, vocab]).
        With gradient checkpointing, call `backward` inside `self.hlora.use(plugins)` too (as the training loop does):
        checkpointed layers recompute their forward there and must see the same plugins."""
        names = self.check_plugins(plugins, input_ids.shape[0])
        with self.hlora.use(names):
            embeds = self.embed(input_ids, pixel_values, names)
            if labels is None:
                return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, **llm_kwargs)
            labels = labels.masked_fill(input_ids == IMAGE_TOKEN_INDEX, IGNORE_INDEX)
            return self._supervised(embeds, attention_mask, labels, **llm_kwargs)

    def _supervised(
        self,
        embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor,
        num_items_in_batch: int | torch.Tensor | None = None,
        **llm_kwargs,
    ):
        """The HF model's output with its causal-LM loss, the head applied only where the next token is supervised
        (transformers' `logits_to_keep`, as positions per row). Prompts, image slots and padding, most of a training
        sequence, then cost neither the head's matmul nor float32 logits; the loss is the one `labels=` would give.
        Rows stay rows, so a per-sample head (a plugin's fusion table) still sees one row per sample."""
        targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # each position's next token
        kept = targets != IGNORE_INDEX
        width = max(int(kept.sum(dim=1).max()), 1)
        # each row's supervised positions first (in order), then unsupervised ones, whose targets the loss ignores
        positions = torch.sort(kept.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=positions, **llm_kwargs)
        out.loss = self.llm.loss_function(
            logits=out.logits,
            labels=None,
            vocab_size=out.logits.shape[-1],
            num_items_in_batch=num_items_in_batch,
            shift_labels=targets.gather(1, positions),
        )
        return out


def build_model(
    config: HealthGPTConfig,
    llm: PreTrainedModel,
    vision: VisionEncoder,
    tokenizer: PreTrainedTokenizerBase,
    *,
    init_adapters: bool = True,
) -> HealthGPTModel:
    """Compose a HealthGPT model from a loaded base LLM, CLIP tower and tokenizer: image vocabulary (Phi variants),
    H-LoRA plugins on every LLM linear but `lm_head`, and a freshly initialised projector per plugin."""
    vocab = attach_image_vocab(llm, tokenizer, config.vq.num_codes) if config.add_image_tokens else None
    dtype = llm.get_input_embeddings().weight.dtype
    hlora = inject_hlora(llm, config.plugins, dtype=dtype, init=init_adapters)
    hidden = llm.config.hidden_size
    projectors = {name: build_projector(vision.hidden_size, hidden).to(dtype) for name in config.plugins}
    layers = {name: plugin.vision_layer for name, plugin in config.plugins.items()}
    span = config.vq.num_image_tokens
    return HealthGPTModel(llm, hlora, vision, projectors, layers, vocab, vision.num_patches, span)
