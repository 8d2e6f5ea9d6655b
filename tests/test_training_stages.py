"""The three stages as data: Table 7 values, recipe files and overrides, and per-stage freezing checked by training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import phantoms_with_codes, tiny_config

from healthgpt.api import HealthGPT
from healthgpt.config import COMPREHENSION, GENERATION, get_variant
from healthgpt.errors import CheckpointError
from healthgpt.nano import nano_tokenizer, random_llm, random_vision
from healthgpt.training.checkpointing import merge_stage_outputs, read_stage_output
from healthgpt.training.loop import build_healthgpt, export_model, run_stage
from healthgpt.training.stages import RecipeError, load_recipe, prepare_stage, select_parameters, table7
from healthgpt.vision import ImagePreprocessor

STAGES = ("stage1_comprehension", "stage1_generation", "stage2", "stage3_comprehension", "stage3_generation")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_table7_defaults() -> None:
    m3, l14 = table7("m3"), table7("l14")
    assert list(m3) == list(STAGES)
    columns = [(s.adapter_lr, s.lr, s.global_batch_size, s.dropout, s.schedule) for s in m3.values()]
    assert columns == [
        (1e-3, 2e-4, 256, 0.0, "cosine"),
        (2e-5, 2e-4, 64, 0.05, "cosine"),
        (2e-5, 2e-4, 32, 0.05, "constant"),
        (2e-5, 2e-4, 128, 0.05, "cosine"),
        (2e-5, 2e-4, 64, 0.05, "cosine"),
    ]
    assert l14["stage1_generation"].lr == 1e-4 and l14["stage2"] == m3["stage2"]
    assert m3["stage1_generation"].trainable == (f"projector:{GENERATION}", f"plugin:{GENERATION}")
    assert m3["stage2"].trainable == ("embeddings", "head") and m3["stage2"].tasks == (COMPREHENSION, GENERATION)
    assert m3["stage3_comprehension"].init_from == ("stage2",)
    assert all(s.weight_decay == 0.0 for s in m3.values())


def test_recipe_file_and_dotted_overrides(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("output_dir: runs/x\npreset: l14\nengine: {micro_batch_size: 4}\nstages:\n  stage2: {epochs: 2}\n")
    recipe = load_recipe(
        path,
        ["stage3.lr=3e-4", "--train.max_steps=7", "stage1_comprehension.trainable=[head]", "data.max_length=512"],
        stage="stage2",
    )
    assert recipe.stage("stage3_comprehension").lr == recipe.stage("stage3_generation").lr == 3e-4
    assert recipe.stage("stage2").max_steps == 7 and recipe.stage("stage2").epochs == 2
    assert recipe.stage("stage1_generation").lr == 1e-4  # the l14 preset
    assert recipe.stage("stage1_comprehension").trainable == ("head",)
    assert (recipe.engine.micro_batch_size, recipe.data.max_length, recipe.output_dir) == (4, 512, "runs/x")
    with pytest.raises(RecipeError, match="unknown field"):
        load_recipe(path, ["stage2.learning_rate=1"])
    with pytest.raises(RecipeError, match="no section or stage"):
        load_recipe(path, ["stage9.lr=1"])
    with pytest.raises(RecipeError, match="needs the stage being run"):
        load_recipe(path, ["train.lr=1"])
    with pytest.raises(RecipeError, match="schedule must be"):
        load_recipe(path, ["stage2.schedule=linear"])
    with pytest.raises(RecipeError, match=r"condition_dropout each in \[0, 1\), got 16, 0.03, 0.05, 1.0 and 0.0"):
        load_recipe(path, ["stage2.global_batch_size=16", "stage2.code_noise=1.0"])
    with pytest.raises(RecipeError, match=r"got 16, 0.03, 0.05, 0.0 and -0.1"):
        load_recipe(path, ["stage2.global_batch_size=16", "stage2.condition_dropout=-0.1"])
    with pytest.raises(RecipeError, match="needs `output_dir`"):
        load_recipe(None, [])
    # the --help example: one data file as a plain string, as a list would give it
    assert load_recipe(path, ["train.data=my.json"], stage="stage2").stage("stage2").data == ("my.json",)
    assert load_recipe(path, ["stage2.data=[a.json, b.json]"]).stage("stage2").data == ("a.json", "b.json")


def test_selectors_pick_exactly_the_stage_parameters() -> None:
    model = HealthGPT.random("nano", seed=0).model
    names = {n for n, _ in model.named_parameters()}
    expected = {
        "stage1_comprehension": {n for n in names if n.startswith("projectors.comprehension.")},
        "stage1_generation": {
            n for n in names if n.startswith("projectors.generation.") or ".plugins.generation." in n
        },
        "stage2": {"llm.model.embed_tokens.weight", "llm.lm_head.weight"},
        "stage3_comprehension": {
            n for n in names if n.startswith("projectors.comprehension.") or ".plugins.comprehension." in n
        },
    }
    for name, want in expected.items():
        groups = prepare_stage(model, table7()[name])
        assert {n for n, p in model.named_parameters() if p.requires_grad} == want, name
        assert sum(len(g["params"]) for g in groups) == len(want)
    model.requires_grad_(False)
    lrs = {g["lr"] for g in prepare_stage(model, table7()["stage1_generation"])}
    assert lrs == {2e-5, 2e-4}  # projector at the adapter LR, plugin at the H-LoRA LR
    model.requires_grad_(False)
    with pytest.raises(RecipeError, match="unknown trainable selector 'plugin:segmentation'"):
        select_parameters(model, ["plugin:segmentation"])


def test_vision_selector_trains_only_the_tower_layers_its_plugin_alone_reads(tmp_path: Path) -> None:
    """nano reads generation at hidden_states[1] and comprehension at [-2] of 4 layers: encoder layers 1 and 2 are
    comprehension's own. One step moves them (at `vision_lr`) and comprehension's features, not generation's."""
    hg = HealthGPT.random("nano", seed=0)
    model = hg.model
    names = {n for n, _ in model.named_parameters()}
    tower = next(n for n in names if ".layers.0." in n and n.startswith("vision.")).split(".layers.0.")[0]
    own = {n for n in names if n.startswith((f"{tower}.layers.1.", f"{tower}.layers.2."))}
    assert own and set(select_parameters(model, ["vision:comprehension"])["vision:comprehension"]) == own
    with pytest.raises(RecipeError, match="reads the CLIP tower at hidden_states\\[1\\], no deeper than another"):
        select_parameters(model, ["vision:generation"])

    stage = dataclasses.replace(
        table7()["stage3_comprehension"],
        trainable=("plugin:comprehension", "vision:comprehension"),
        vision_lr=1e-2,
    )
    groups = prepare_stage(model, stage)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == own | {
        n for n in names if ".plugins.comprehension." in n
    }
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert by_lr[1e-2] == {id(p) for n, p in model.named_parameters() if n in own}
    pixels = torch.rand(2, 3, 112, 112)
    before = model.vision.features(pixels, [1, -2])
    model.projectors.comprehension.requires_grad_(True)  # the loss reaches the tower through the projector
    loss = model._project(pixels, [COMPREHENSION, COMPREHENSION]).square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n in own)
    torch.optim.SGD([p for n, p in model.named_parameters() if n in own], lr=1.0).step()
    with torch.no_grad():
        after = model.vision.features(pixels, [1, -2])
    assert torch.equal(after[1], before[1]) and not torch.allclose(after[-2], before[-2])
    with pytest.raises(CheckpointError, match="layers of the CLIP tower were trained"):  # a referenced tower lacks them
        hg.save_pretrained(tmp_path / "bundle")
    saved = hg.save_pretrained(tmp_path / "bundle", include_base=True)
    loaded = HealthGPT.from_pretrained(saved).model
    with torch.no_grad():
        assert torch.equal(loaded.vision.features(pixels, [-2])[-2], after[-2])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return phantoms_with_codes(tmp_path_factory.mktemp("phantoms"), seed=0)


def test_each_stage_trains_its_parameters_and_leaves_the_rest_bitwise_unchanged(phantoms: Path, tmp_path) -> None:
    overrides = [
        f"output_dir={tmp_path}",
        f"data.code_cache={phantoms / 'codes'}",
        "engine.micro_batch_size=2",
        "engine.save_every=100",
        *[f"{s}.data=[{phantoms / 'train.json'}]" for s in STAGES],
        *[f"{s}.global_batch_size=2" for s in STAGES],
        *[f"{s}.max_steps=2" for s in STAGES],  # B starts at zero: A and the router move from step 2 on
        "stage1.adapter_lr=1e-2",
    ]
    hg = HealthGPT.random("nano", seed=0)
    recipe = load_recipe(None, overrides)
    for name in STAGES:
        before = {k: v.clone() for k, v in hg.model.state_dict().items()}
        if recipe.stage(name).init_from:  # the stage starts from its init stages' outputs
            inherited, _ = merge_stage_outputs([tmp_path / s / "output" for s in recipe.stage(name).init_from])
            before.update(inherited)
        run_stage(recipe, name, healthgpt=hg)
        trainable = {k for group in select_parameters(hg.model, recipe.stage(name).trainable).values() for k in group}
        after = hg.model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        assert changed == trainable, (name, sorted(changed ^ trainable)[:5])
        tensors, origins = read_stage_output(tmp_path / name / "output")
        assert {k for k, o in origins.items() if o == name} == trainable
        assert all(torch.equal(tensors[k], after[k]) for k in tensors)
    # Stage 3 starts from stage 2: the stage-3 generation output carries stage 2's embeddings and head.
    tensors, origins = read_stage_output(tmp_path / "stage3_generation" / "output")
    assert origins["llm.lm_head.weight"] == "stage2" and origins["projectors.comprehension.0.weight"] == (
        "stage1_comprehension"
    )
    # The final model: both stage-3 outputs merged (each plugin from the run that trained it), as a loadable bundle.
    merged, _ = merge_stage_outputs([tmp_path / s / "output" for s in STAGES[3:]])
    comp, gen = (
        read_stage_output(tmp_path / STAGES[3] / "output")[0],
        read_stage_output(tmp_path / STAGES[4] / "output")[0],
    )
    key = "llm.model.layers.0.mlp.down_proj.plugins.{}.lora_B.weight"
    assert torch.equal(merged[key.format("comprehension")], comp[key.format("comprehension")])
    assert torch.equal(merged[key.format("generation")], gen[key.format("generation")])
    bundle = export_model(None, tmp_path / "bundle", overrides=overrides, include_base=True)
    loaded = HealthGPT.from_pretrained(bundle).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in merged.items())


def test_a_stage_that_trains_tower_layers_saves_them_and_exports_them_only_with_the_base(
    phantoms: Path, tmp_path: Path
) -> None:
    overrides = [
        f"output_dir={tmp_path}",
        f"data.code_cache={phantoms / 'codes'}",
        "engine.micro_batch_size=2",
        f"stage3_comprehension.data=[{phantoms / 'train.json'}]",
        "stage3_comprehension.init_from=[]",
        "stage3_comprehension.global_batch_size=2",
        "stage3_comprehension.max_steps=2",
        "stage3_comprehension.trainable=[plugin:comprehension,vision:comprehension]",
        "stage3_comprehension.vision_lr=1e-2",
    ]
    recipe = load_recipe(None, overrides)
    hg = HealthGPT.random("nano", seed=0)
    start = {k: v.clone() for k, v in hg.model.state_dict().items()}
    run_stage(recipe, "stage3_comprehension", healthgpt=hg)
    tensors, origins = read_stage_output(tmp_path / "stage3_comprehension" / "output")
    tower = {k for k in tensors if k.startswith("vision.")}
    assert tower == set(select_parameters(hg.model, ["vision:comprehension"])["vision:comprehension"])
    assert {origins[k] for k in tower} == {"stage3_comprehension"}
    assert all(not torch.equal(tensors[k], start[k]) for k in tower if k.endswith("q_proj.weight"))
    with pytest.raises(RecipeError, match="trained layers of the CLIP tower.*--include-base"):
        export_model(None, tmp_path / "bundle", overrides=overrides)
    assert not (tmp_path / "bundle").exists()
    bundle = export_model(None, tmp_path / "bundle", overrides=overrides, include_base=True)
    loaded = HealthGPT.from_pretrained(bundle).model.state_dict()
    assert all(torch.equal(loaded[k], tensors[k]) for k in tower)


CONFIGS = Path(__file__).resolve().parents[1] / "src" / "healthgpt" / "training" / "configs"


def test_shipped_recipes_and_launch_configs_are_valid() -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    recipes = {p.stem: load_recipe(p) for p in sorted((CONFIGS / "recipes").glob("*.yaml"))}
    assert set(recipes) == {"m3", "l14"}
    for name, recipe in recipes.items():
        assert list(recipe.stages) == list(STAGES) and all(s.data for s in recipe.stages.values())
        assert recipe.stages == {k: dataclasses.replace(v, data=recipe.stages[k].data) for k, v in table7(name).items()}
    assert recipes["l14"].model.plugins[GENERATION]["rank"] == 256
    kinds = {
        p.stem: str(load_config_from_file(str(p)).distributed_type) for p in (CONFIGS / "accelerate").glob("*.yaml")
    }
    assert kinds == {
        "single_gpu": "DistributedType.NO",
        "ddp": "DistributedType.MULTI_GPU",
        "deepspeed_zero2": "DistributedType.DEEPSPEED",
        "deepspeed_zero3": "DistributedType.DEEPSPEED",
        "fsdp": "DistributedType.FSDP",
    }


def test_starting_model_from_base_folders(tmp_path: Path) -> None:
    config = get_variant("nano")
    tokenizer = nano_tokenizer(config.llm.vocab_rows, config.template)
    llm = random_llm(config.llm, len(tokenizer), seed=5, pad_token_id=tokenizer.pad_token_id)
    vision = random_vision(config.vision, seed=6)
    llm.save_pretrained(tmp_path / "llm")
    tokenizer.save_pretrained(tmp_path / "llm")
    vision.tower.save_pretrained(tmp_path / "clip")
    pre = ImagePreprocessor.for_clip(config.vision.image_size, config.vision.image_mean, config.vision.image_std)
    pre.processor.save_pretrained(tmp_path / "clip")
    paths = [f"model.base_llm={tmp_path / 'llm'}", f"model.vision_tower={tmp_path / 'clip'}"]
    built = build_healthgpt(load_recipe(None, ["output_dir=x", *paths]))
    n = len(tokenizer)
    assert built.model.plugin_names == (COMPREHENSION, GENERATION) and built.model.image_vocab.start_id == n
    assert torch.equal(built.model.llm.lm_head.weight[:n], llm.lm_head.weight)
    assert all(torch.equal(a, b) for a, b in zip(built.model.vision.parameters(), vision.parameters(), strict=True))


def test_image_layout_is_the_variants_unless_the_recipe_sets_it() -> None:
    def layout(*overrides: str) -> bool:
        return build_healthgpt(load_recipe(None, ["output_dir=x", *overrides])).config.images_after_text

    assert not layout() and layout("model.variant=mini")  # published layout for nano; mini reads images last
    assert not layout("model.variant=mini", "model.images_after_text=false")
    assert layout("model.images_after_text=true")
    with pytest.raises(RecipeError, match="leave model.base_llm, vision_tower, plugins and images_after_text unset"):
        build_healthgpt(load_recipe(None, ["output_dir=x", "model.init=nano", "model.images_after_text=true"]))


def test_the_default_guidance_is_the_models_unless_the_recipe_sets_it_and_the_bundle_keeps_it(tmp_path: Path) -> None:
    def built(*overrides: str) -> HealthGPT:
        return build_healthgpt(load_recipe(None, ["output_dir=x", *overrides]))

    assert built().config.guidance_scale == 1.0 and built("model.init=nano").config.guidance_scale == 1.0
    assert built("model.variant=mini", "model.guidance_scale=2.5").config.guidance_scale == 2.5
    tuned = built("model.init=nano", "model.guidance_scale=2")  # fine-tuning a bundle may change its default
    assert HealthGPT.from_pretrained(tuned.save_pretrained(tmp_path / "b")).config.guidance_scale == 2.0
    for bad in ("0", "-1", "inf"):
        with pytest.raises(RecipeError, match=r"model.guidance_scale must be a finite number above 0"):
            load_recipe(None, ["output_dir=x", f"model.guidance_scale={bad}"])


def test_code_noise_on_a_model_without_image_codes_is_refused_before_training(tmp_path: Path) -> None:
    hg = HealthGPT.random(tiny_config("qwen2"), seed=0)  # the xl32 family: no image tokens, no generation plugin
    recipe = load_recipe(None, [f"output_dir={tmp_path}", "stage3_comprehension.code_noise=0.2"])
    with pytest.raises(RecipeError, match="code_noise needs a model with image-code tokens; set stage3_comprehension"):
        run_stage(recipe, "stage3_comprehension", healthgpt=hg)
    assert not (tmp_path / "stage3_comprehension" / "output").exists()


def test_plugin_fields_replace_the_variants_own_and_bad_ones_are_refused_when_the_recipe_loads() -> None:
    def plugins(*overrides: str) -> dict:
        return build_healthgpt(load_recipe(None, ["output_dir=x", "model.variant=mini", *overrides])).config.plugins

    mini = get_variant("mini").plugins
    changed = plugins("model.plugins.comprehension.vision_layer=1")
    assert changed[COMPREHENSION] == dataclasses.replace(mini[COMPREHENSION], vision_layer=1)  # rank, alpha kept
    assert changed[GENERATION] == mini[GENERATION]
    extra = plugins("model.plugins.report.rank=4", "model.plugins.report.alpha=8")["report"]
    assert (extra.rank, extra.alpha, extra.vision_layer) == (4, 8, -2)
    for bad, reason in (
        ("model.plugins.comprehension.layer=1", "unexpected keyword argument 'layer'"),
        ("model.plugins.report.vision_layer=1", "missing 2 required positional arguments"),
        ("model.plugins.comprehension.rank=6", "must be a multiple of num_experts"),
    ):
        with pytest.raises(RecipeError, match=rf"model.plugins.\w+: .*{reason}.*a new plugin needs rank and alpha"):
            load_recipe(None, ["output_dir=x", "model.variant=mini", bad])
