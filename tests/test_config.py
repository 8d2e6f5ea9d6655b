"""The config tree: variants carry the published numbers, and every config round-trips through JSON."""

from __future__ import annotations

import pytest

from healthgpt.config import COMPREHENSION, GENERATION, VARIANTS, HealthGPTConfig, PluginConfig, get_variant


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_json_round_trip(name, tmp_path):
    config = get_variant(name)
    config.save(tmp_path / "config.json")
    assert HealthGPTConfig.load(tmp_path / "config.json") == config


def test_published_numbers():
    m3, l14, xl32 = get_variant("m3"), get_variant("l14"), get_variant("xl32")
    assert (m3.llm.arch, m3.llm.hidden_size, m3.llm.num_layers, m3.llm.vocab_rows) == ("phi3", 3072, 32, 32064)
    assert (l14.llm.hidden_size, l14.llm.num_layers, l14.llm.num_kv_heads) == (5120, 40, 10)
    assert (xl32.llm.arch, xl32.llm.num_layers, xl32.llm.num_kv_heads, xl32.add_image_tokens) == ("qwen2", 64, 8, False)
    ranks = {
        (v, p): (c.rank, c.alpha, c.vision_layer)
        for v in ("m3", "l14", "xl32")
        for p, c in get_variant(v).plugins.items()
    }
    assert ranks == {
        ("m3", COMPREHENSION): (64, 128, -2),
        ("m3", GENERATION): (256, 512, 1),
        ("l14", COMPREHENSION): (32, 64, -2),
        ("xl32", COMPREHENSION): (32, 64, -2),
    }
    # alpha / R * k = 8 for every released plugin (REFERENCE §2.1); per-expert ranks 16 / 64 / 8 / 8.
    for v in ("m3", "l14", "xl32"):
        for plugin in get_variant(v).plugins.values():
            assert plugin.scaling == 8
    assert [p.rank // p.num_experts for p in m3.plugins.values()] == [16, 64]
    assert m3.vision.num_patches == 576 and m3.vq.num_image_tokens == 1024 and m3.vq.num_codes == 8192
    assert [get_variant(v).template for v in ("m3", "l14", "xl32")] == ["phi3_instruct", "phi4_instruct", "qwen_2"]


def test_bad_values_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of num_experts"):
        PluginConfig(rank=10, alpha=20, num_experts=4)
    with pytest.raises(ValueError, match="unknown variant 'm4'"):
        get_variant("m4")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid HealthGPT config.json"):
        HealthGPTConfig.load(tmp_path / "config.json")


def test_the_default_guidance_scale_is_saved_and_an_older_config_reads_as_none(tmp_path):
    guided = get_variant("mini").replace(guidance_scale=2.5)
    guided.save(tmp_path / "config.json")
    assert HealthGPTConfig.load(tmp_path / "config.json").guidance_scale == 2.5
    tree = get_variant("nano").to_dict()
    del tree["guidance_scale"]  # a bundle written before the field existed
    assert HealthGPTConfig.from_dict(tree).guidance_scale == 1.0
    for bad in (0, -1.0, float("nan"), float("inf"), "2", True):
        with pytest.raises(ValueError, match=r"guidance_scale must be a finite number above 0 \(1: no guidance\)"):
            get_variant("nano").replace(guidance_scale=bad)
