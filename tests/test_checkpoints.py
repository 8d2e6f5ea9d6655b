"""Loading the official HealthGPT files and our bundle (`healthgpt.checkpoints`, `healthgpt.hub`).

Tiny releases of the three variants' architectures are written to tmp folders by `_official` (base folders, and
H-LoRA, projector and fusion files in the official key layout and dtype from a spec after REFERENCE §2.3/§2.4, not
from our module paths). Expected logits come from the same base model with those tensors assigned by hand.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import huggingface_hub
import pytest
import torch
from _official import Case, P, hand_model, logits, make_case
from safetensors.torch import save_file
from transformers import AutoTokenizer

from healthgpt.api import HealthGPT
from healthgpt.checkpoints import CheckpointError, convert_official, load_state_file
from healthgpt.config import COMPREHENSION, GENERATION
from healthgpt.generation import Request, SamplingParams, stream
from healthgpt.hub import WeightsNotFoundError
from healthgpt.model import HealthGPTModel
from healthgpt.templates import get_template
from healthgpt.tokens import PromptTokenizer
from healthgpt.vqgan import VQGAN


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    made: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = make_case(tmp_path_factory.mktemp(name), name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def expected(cases):
    """Logits of the hand-assigned model of a case for a plugin, with or without the fusion tables (memoised)."""
    memo: dict[tuple[str, str, bool], torch.Tensor] = {}

    def get(name: str, plugin: str, fused: bool = False) -> torch.Tensor:
        if (name, plugin, fused) not in memo:
            model = hand_model(cases(name), fused)
            for p in model.plugin_names:
                memo[name, p, fused] = logits(model, p)
        return memo[name, plugin, fused]

    return get


def load_official(case: Case, plugins: list[str], **kw) -> HealthGPT:
    files = {p: case.files[p] for p in plugins}
    fusion = case.files.get("fusion") if GENERATION in plugins else None
    return HealthGPT.from_pretrained(
        variant=case.config, base_model=case.base, vision_tower=case.clip, plugin_files=files, fusion_file=fusion, **kw
    )


# ----- official layout ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["m3", "l14", "xl32"])
def test_official_files_give_the_logits_of_tensors_assigned_by_hand(cases, expected, name):
    case = cases(name)
    loaded = load_official(case, [COMPREHENSION])
    assert torch.equal(logits(loaded.model, COMPREHENSION), expected(name, COMPREHENSION))
    assert loaded.model.plugin_names == (COMPREHENSION,)
    layer = loaded.model.llm.model.layers[0].self_attn
    if name == "xl32":  # Qwen2's q/k/v biases stay in the wrapped base layers
        assert layer.q_proj.base_layer.bias is not None and loaded.model.image_vocab is None
    else:
        assert loaded.model.image_vocab is not None and layer.qkv_proj.base_layer.bias is None


def _rewrite(case: Case, tmp_path: Path, edit) -> Path:
    state = dict(case.tensors[COMPREHENSION])
    edit(state)
    path = tmp_path / "com_hlora_weights.bin"
    torch.save(state, path)
    return path


MISSING = f"{P}model.layers.1.mlp.down_proj.lora_B.weight"
RENAMED = f"{P}model.layers.0.self_attn.o_proj.lora_A.weight"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s.pop(MISSING), rf"1 missing: {MISSING}$"),
        (
            lambda s: s.update({RENAMED.replace("model.layers", "model.layer"): s.pop(RENAMED)}),
            rf"1 missing: {RENAMED}; 1 unused: {RENAMED.replace('model.layers', 'model.layer')}",
        ),
        (lambda s: s.update({f"{P}model.embed_tokens.weight": torch.zeros(3, 64)}), "1 unused: .*embed_tokens"),
        (
            lambda s: s.update(
                {k: v[:, :4] if "lora_B" in k else v[:4] for k, v in s.items() if "lora_A" in k or "lora_B" in k}
            ),  # fmt: skip
            "rank 4 with 4 experts, but plugin 'comprehension' is configured with rank 8",
        ),
        (lambda s: s.update({MISSING: s[MISSING][:, :4]}), r"ranks found \[4, 8\]"),
        (lambda s: s.update({f"{P}model.mm_projector.2.bias": torch.zeros(65)}), r"wrong shape: .*2\.bias .*\[65\]"),
    ],
    ids=["missing", "renamed", "extra", "rank", "mixed-rank", "projector-shape"],
)
@pytest.mark.parametrize("name", ["m3", "l14", "xl32"])
def test_official_files_that_do_not_fit_raise_naming_the_key(cases, tmp_path, name, edit, message):
    case = cases(name)
    path = _rewrite(case, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as error:
        HealthGPT.from_pretrained(
            variant=case.config, base_model=case.base, vision_tower=case.clip, plugin_files={COMPREHENSION: path}
        )
    assert str(path) in str(error.value)


def test_bin_files_are_read_without_running_pickled_code(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)

    path = tmp_path / "com_hlora_weights.bin"
    torch.save({"x": torch.zeros(1), "y": Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle") as refused:
        load_state_file(path)
    assert not marker.exists()
    message = str(refused.value)  # one short line: the file, the object found, the fix; not torch's advice
    assert "\n" not in message and "weights_only=False" not in message and len(message) < 300
    assert message.startswith(f"{path}: holds Python objects other than tensors (getattr); refusing")  # Path.touch


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, these are not weights" * 20, "cannot read the weights"),
        (bytes(range(256)) * 2, "not a weight file"),
    ],
    ids=["text", "random bytes"],
)
def test_a_bin_of_garbage_is_a_checkpoint_error_naming_it(tmp_path, content, message):
    path = tmp_path / "com_hlora_weights.bin"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as error:
        load_state_file(path)
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_weights_with_nan_or_inf_are_refused_at_load(tmp_path, bad, suffix):
    state = {"mm_projector.0.weight": torch.ones(2, 2), "steps": torch.arange(3)}
    state["mm_projector.0.weight"][1, 0] = bad
    path = tmp_path / f"fusion_layer_weights{suffix}"
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"tensor mm_projector\.0\.weight holds NaN or infinite values"):
        load_state_file(path)
    state["mm_projector.0.weight"][1, 0] = 0.5
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    assert torch.equal(load_state_file(path)["mm_projector.0.weight"], state["mm_projector.0.weight"])


@pytest.mark.parametrize("fusion", ["generation", "all", "none"])
def test_fusion_layer_modes(cases, expected, fusion):
    """generation (published): comprehension on base rows, generation on the fusion tables; all: both on the
    fusion tables; none: both on base rows. A mixed batch gives each row its own tables."""
    loaded = load_official(cases("m3"), [COMPREHENSION, GENERATION], fusion=fusion).model
    com, gen = logits(loaded, COMPREHENSION), logits(loaded, GENERATION)
    assert torch.equal(com, expected("m3", COMPREHENSION, fused=fusion == "all"))
    assert torch.equal(gen, expected("m3", GENERATION, fused=fusion != "none"))
    mixed = logits(loaded, [COMPREHENSION, GENERATION], batch=2)
    torch.testing.assert_close(mixed, torch.cat([com, gen]), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(com, gen)


def test_generation_loop_uses_the_generation_plugins_tables(cases):
    case = cases("m3")
    loaded = load_official(case, [COMPREHENSION, GENERATION]).model
    published = hand_model(case, fusion_everywhere=True)  # the published generation model: fusion tables throughout

    def step_logits(model: HealthGPTModel) -> torch.Tensor:
        request = Request(input_ids=[5, 17, 42, model.image_vocab.first_code_id + 3], plugin=GENERATION)
        steps = stream(model, [request], SamplingParams(max_new_tokens=2), stop_ids=[], pad_id=0, return_logits=True)
        return torch.stack([step.logits[0] for step in steps])

    assert torch.equal(step_logits(loaded), step_logits(published))


def test_generation_without_fusion_file_raises_naming_it(cases, offline):
    case = cases("m3")
    with pytest.raises(WeightsNotFoundError, match=r"fusion_file: fusion_layer_weights\.bin .*fusion='none'"):
        HealthGPT.from_pretrained(
            variant=case.config, base_model=case.base, vision_tower=case.clip,
            plugin_files={GENERATION: case.files[GENERATION]}, cache_dir=offline,
        )  # fmt: skip


def test_prompts_use_the_sentencepiece_file_and_the_system_prompt_can_change(cases):
    case = cases("m3")
    loaded = load_official(case, [COMPREHENSION], system_prompt="Answer briefly.")
    reference = PromptTokenizer(
        AutoTokenizer.from_pretrained(case.base), sentencepiece_model=case.base / "tokenizer.model"
    )
    request = loaded.build_request([{"role": "user", "content": "What is seen?"}])
    prompt = get_template("phi3_instruct").render(
        [{"role": "user", "content": "What is seen?"}], system="Answer briefly."
    )
    assert request.input_ids == reference.encode_prompt(prompt)
    assert request.input_ids[0] == reference.tokenizer.convert_tokens_to_ids("▁")  # the published slow-tokenizer quirk


def test_dtype_argument(cases):
    loaded = load_official(cases("l14"), [COMPREHENSION], dtype="bfloat16")
    dtypes = {p.dtype for p in loaded.model.parameters()}
    assert dtypes == {torch.bfloat16} and loaded.config.dtype == "bfloat16"


# ----- our bundle --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "fusion", "include_base"),
    [("m3", "generation", False), ("m3", "generation", True), ("m3", "all", False), ("xl32", "generation", False)],
)
def test_convert_then_load_bundle_is_bit_identical(cases, expected, tmp_path, name, fusion, include_base):
    """The bundle of the official files gives the official logits bit for bit (= the hand-assigned ones)."""
    case = cases(name)
    plugins = list(case.config.plugins)
    vqgan = None
    if case.config.add_image_tokens:
        vqgan = tmp_path / "vqgan"
        VQGAN.from_config(case.config.vq).save(vqgan)
    kw = dict(
        variant=case.config, base_model=case.base, vision_tower=case.clip, fusion=fusion, vqgan=vqgan,
        plugin_files={p: case.files[p] for p in plugins}, fusion_file=case.files.get("fusion"),
    )  # fmt: skip
    bundle = convert_official(tmp_path / "bundle", include_base=include_base, **kw)
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert (manifest["llm"] == "llm") == include_base
    loaded = HealthGPT.from_pretrained(bundle)
    for plugin in plugins:
        fused = case.config.add_image_tokens and (fusion == "all" or plugin == GENERATION)
        assert torch.equal(logits(loaded.model, plugin), expected(name, plugin, fused))
    reference = PromptTokenizer(AutoTokenizer.from_pretrained(case.base), sentencepiece_model=_spm(case.base))
    prompt = get_template(case.config.template).render([{"role": "user", "content": "Is there a lesion?"}])
    assert loaded.build_request([{"role": "user", "content": "Is there a lesion?"}]).input_ids == (
        reference.encode_prompt(prompt)
    )
    vq = dataclasses.replace(case.config.vq, source=str(vqgan) if vqgan else None)
    assert loaded.config.replace(llm=case.config.llm, vision=case.config.vision) == case.config.replace(vq=vq)
    if vqgan is not None:
        for key, value in VQGAN.load(vqgan).state_dict().items():
            assert torch.equal(loaded.vqgan.state_dict()[key], value)


def _spm(folder: Path) -> Path | None:
    return folder / "tokenizer.model" if (folder / "tokenizer.model").is_file() else None


def test_truncated_bundle_file_raises_naming_it(cases, tmp_path):
    case = cases("xl32")
    bundle = convert_official(
        tmp_path / "bundle", variant=case.config, base_model=case.base, vision_tower=case.clip,
        plugin_files={COMPREHENSION: case.files[COMPREHENSION]},
    )  # fmt: skip
    path = bundle / "plugins" / "comprehension.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"comprehension\.safetensors: cannot read .*truncated"):
        HealthGPT.from_pretrained(bundle)


def test_bundle_refuses_a_changed_base_and_existing_target(cases, tmp_path):
    case = cases("xl32")
    base = tmp_path / "base"
    shutil.copytree(case.base, base)
    kw = dict(
        variant=case.config,
        base_model=base,
        vision_tower=case.clip,
        plugin_files={COMPREHENSION: case.files[COMPREHENSION]},
    )
    bundle = convert_official(tmp_path / "bundle", **kw)
    with pytest.raises(ValueError, match="not empty"):
        convert_official(bundle, **kw)
    with (base / "model.safetensors").open("ab") as f:
        f.write(b"\0" * 8)
    with pytest.raises(CheckpointError, match="changed since the bundle was written"):
        HealthGPT.from_pretrained(bundle)
    assert HealthGPT.from_pretrained(bundle, base_model=case.base).model.plugin_names == (COMPREHENSION,)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_save_pretrained_of_a_random_model_includes_the_base(tmp_path):
    model = HealthGPT.random("nano", seed=0)
    with pytest.raises(CheckpointError, match="include_base=True"):
        model.save_pretrained(tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    loaded = HealthGPT.from_pretrained(model.save_pretrained(tmp_path / "nano", include_base=True))
    for plugin in model.model.plugin_names:
        assert torch.equal(logits(loaded.model, plugin), logits(model.model, plugin))


# ----- Hub ---------------------------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch, tmp_path) -> Path:
    """HF_HUB_OFFLINE=1 and an empty Hub cache folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    cache.mkdir()
    return cache


def test_offline_hub_id_error_names_every_file_and_where_to_put_it(offline):
    with pytest.raises(WeightsNotFoundError) as error:
        HealthGPT.from_pretrained("lintw/HealthGPT-M3", cache_dir=offline)
    message = str(error.value)
    for needed in (
        "base_model: a local folder of microsoft/Phi-3-mini-4k-instruct",
        "vision_tower: a local folder of openai/clip-vit-large-patch14-336",
        "plugin_files['comprehension']: com_hlora_weights.bin from https://huggingface.co/lintw/HealthGPT-M3",
        "plugin_files['generation']: gen_hlora_weights.bin",
        "fusion_file: fusion_layer_weights.bin",
    ):
        assert needed in message


def _cache_repo(cache: Path, repo: str, files: list[Path]) -> None:
    """Place files in the Hub cache layout, as a download would have left them."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in files:
        shutil.copyfile(file, snapshot / file.name)


def test_variant_files_resolve_from_the_hub_cache(cases, expected, offline):
    case = cases("l14")
    _cache_repo(offline, "lintw/HealthGPT-L14", [case.files[COMPREHENSION]])
    _cache_repo(offline, "microsoft/phi-4", sorted(case.base.iterdir()))
    _cache_repo(offline, "openai/clip-vit-large-patch14-336", sorted(case.clip.iterdir()))
    loaded = HealthGPT.from_pretrained(variant=case.config, cache_dir=offline)
    assert torch.equal(logits(loaded.model, COMPREHENSION), expected("l14", COMPREHENSION))
    # an official folder as the source: the variant is read from the released file name in it
    folder = case.files[COMPREHENSION].parent
    with pytest.raises(WeightsNotFoundError, match="microsoft/phi-4"):
        HealthGPT.from_pretrained(folder, cache_dir=offline.parent / "empty")


def test_a_base_folder_without_tokenizer_uses_its_bundles_tokenizer(tmp_path: Path) -> None:
    """A bundle's `llm/` (the shipped nano's) can be a base model: its tokenizer is the bundle's `tokenizer/`."""
    from healthgpt.checkpoints import embedded_bundle, load_base_llm

    nano = embedded_bundle("nano")
    _, tokenizer, _ = load_base_llm(nano / "llm", torch.float32)
    expected = AutoTokenizer.from_pretrained(nano / "tokenizer")
    assert tokenizer.get_vocab() == expected.get_vocab() and len(tokenizer) == len(expected)
    shutil.copytree(nano / "llm", tmp_path / "llm")  # alone: no tokenizer anywhere near
    with pytest.raises(WeightsNotFoundError, match=r"llm: no tokenizer \(tokenizer.json, .*copy the base model"):
        load_base_llm(tmp_path / "llm", torch.float32)
