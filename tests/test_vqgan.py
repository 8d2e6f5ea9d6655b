"""The taming-compatible VQGAN: architecture keys, deterministic codes, checkpoint files, training, errors."""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from pytest import MonkeyPatch

from healthgpt.config import TAMING_GUMBEL_F8, get_variant
from healthgpt.vqgan import VQGAN, AttnBlock, CheckpointError, VQGANError, load_taming_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "taming_gumbel_f8_keys.txt"
# A small config (ch 16, ch_mult (1,2,2,4), z/embed 16, 256 codes, image 64) with attention at 8 to cover it.
TINY = dict(
    num_codes=256,
    embed_dim=16,
    z_channels=16,
    ch=16,
    ch_mult=(1, 2, 2, 4),
    num_res_blocks=1,
    attn_resolutions=(8,),
    image_size=64,
)
LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(quantizer: str = "gumbel", seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(**TINY, quantizer=quantizer).eval()


def images(n: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def fixture_shapes() -> dict[str, tuple[int, ...]]:
    rows = [line.split() for line in FIXTURE.read_text().splitlines() if line and not line.startswith("#")]
    return {key: tuple(int(d) for d in shape.split(",")) for key, shape in rows}


def shapes(model: VQGAN) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------ architecture


def test_gumbel_f8_keys_and_shapes_match_taming() -> None:
    with torch.device("meta"):
        model = VQGAN.from_config(TAMING_GUMBEL_F8)
    assert shapes(model) == fixture_shapes()
    assert (model.grid, model.num_codes, model.image_size) == (32, 8192, 256)


def test_vqmodel_has_the_taming_embedding_key() -> None:
    with torch.device("meta"):
        model = VQGAN(quantizer="vq")
    expected = {k: v for k, v in fixture_shapes().items() if not k.startswith("quantize.")}
    assert shapes(model) == {**expected, "quantize.embedding.weight": (8192, 256)}


def test_group_norm_is_tamings_and_falls_back_for_tiny_channels() -> None:
    model = tiny()
    low = model.encoder.norm_out  # 64 channels: taming's GroupNorm(32, eps 1e-6)
    assert (low.num_groups, low.num_channels, low.eps) == (32, 64, 1e-6)
    first = model.encoder.down[0].block[0].norm1  # 16 channels cannot hold 32 groups: 16
    assert (first.num_groups, first.num_channels) == (16, 16)


def test_attention_matches_the_taming_formula() -> None:
    torch.manual_seed(0)
    block = AttnBlock(32, num_groups=32)
    x = torch.randn(2, 32, 4, 5)
    with torch.no_grad():
        h = block.norm(x)
        q, k, v = (m(h).reshape(2, 32, 20) for m in (block.q, block.k, block.v))  # (B, C, HW)
        w = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * 32**-0.5, dim=2)  # (B, HW_q, HW_k)
        ref = x + block.proj_out(torch.einsum("bcj,bij->bci", v, w).reshape(2, 32, 4, 5))
        torch.testing.assert_close(block(x), ref)


def test_gumbel_needs_embed_dim_equal_to_z_channels() -> None:
    with pytest.raises(VQGANError, match="embed_dim == z_channels"):
        VQGAN(**{**TINY, "embed_dim": 8})


# ------------------------------------------------------------------------------------------ encode / decode


def test_round_trip_shape_range_and_determinism() -> None:
    model, x = tiny(), images(2)
    codes = model.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert torch.equal(codes, model.encode(x))
    out = model.decode(codes)
    assert out.shape == (2, 3, 64, 64) and -1 <= out.min() and out.max() <= 1
    assert torch.equal(model.decode(codes.reshape(2, 64)), out)  # raster order


def test_batch_of_three_equals_three_single_calls() -> None:
    model, x = tiny(), images(3)
    codes = model.encode(x)
    assert torch.equal(codes, torch.cat([model.encode(x[i : i + 1]) for i in range(3)]))
    singles = torch.cat([model.decode(c[None]) for c in codes])
    torch.testing.assert_close(model.decode(codes), singles, rtol=0, atol=1e-4)  # float32 batched convs


def test_gumbel_codes_are_logit_argmax_and_decode_is_one_hot_times_codebook() -> None:
    model, x = tiny(), images(2)
    codes = model.encode(x)
    with torch.no_grad():
        logits = model.quantize.proj(model.quant_conv(model.encoder(x)))  # (B, N, h, w)
        z = torch.einsum("bhwn,nd->bdhw", F.one_hot(codes, 256).float(), model.quantize.embed.weight)  # §3.2
        ref = model.decoder(model.post_quant_conv(z)).clamp(-1, 1)
    assert torch.equal(codes, logits.argmax(dim=1))
    torch.testing.assert_close(model.decode(codes), ref)


def test_vq_codes_are_the_nearest_codebook_entries() -> None:
    model, x = tiny("vq"), images(2)
    with torch.no_grad():
        model.quantize.embedding.weight.normal_()
        z = model.quant_conv(model.encoder(x)).permute(0, 2, 3, 1).reshape(-1, 16).double()
        e = model.quantize.embedding.weight.double()
        ref = ((z[:, None, :] - e[None]) ** 2).sum(-1).argmin(dim=1)
    assert torch.equal(model.encode(x).flatten(), ref)


def test_codes_to_pil_and_preprocess_match_numpy() -> None:
    model = tiny()
    codes = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    x = model.decode(codes)[0].numpy()
    [pil] = model.codes_to_pil(codes)
    expected = ((np.clip(x, -1, 1) + 1) / 2 * 255).astype(np.uint8).transpose(1, 2, 0)
    assert pil.mode == "RGB" and np.array_equal(np.asarray(pil), expected)

    gray = Image.fromarray((np.arange(80 * 100) % 251).astype(np.uint8).reshape(80, 100), "L")
    batch = model.preprocess([gray, gray.convert("RGB")])
    ref = np.asarray(gray.convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), np.float32) / 255 * 2 - 1
    assert batch.shape == (2, 3, 64, 64) and batch.dtype == torch.float32
    np.testing.assert_allclose(batch[0].permute(1, 2, 0).numpy(), ref, atol=1e-6)
    assert torch.equal(batch[0], batch[1])
    with pytest.raises(VQGANError, match="non-empty list"):
        model.preprocess([])


def test_decode_rejects_wrong_count_range_and_dtype() -> None:
    model = tiny()
    with pytest.raises(VQGANError, match="exactly 64 codes.*got 63"):
        model.decode(torch.zeros(1, 63, dtype=torch.long))
    with pytest.raises(VQGANError, match=r"\[0, 256\), got values from 0 to 256"):
        model.decode(torch.cat([torch.zeros(1, 63, dtype=torch.long), torch.full((1, 1), 256)], dim=1))
    with pytest.raises(VQGANError, match=r"\[0, 256\), got values from -1"):
        model.decode(torch.full((1, 8, 8), -1))
    with pytest.raises(VQGANError, match="integer tensor"):
        model.decode(torch.zeros(1, 64))


def test_encode_rejects_wrong_size_and_pixel_range() -> None:
    model = tiny()
    with pytest.raises(VQGANError, match=r"\(B, 3, 64, 64\).*preprocess"):
        model.encode(images(1, size=32))
    with pytest.raises(VQGANError, match=r"\[-1, 1\]"):
        model.encode(torch.full((1, 3, 64, 64), 255.0))


def test_from_config_nano_matches_config_grid() -> None:
    vq = get_variant("nano").vq
    model = VQGAN.from_config(vq).eval()
    assert (model.grid, model.num_codes) == (vq.grid, vq.num_codes)
    assert model.encode(images(1)).shape == (1, vq.grid, vq.grid)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("quantizer", ["gumbel", "vq"])
def test_reconstruction_plus_quantizer_loss_trains(quantizer: str) -> None:
    torch.manual_seed(0)
    model = VQGAN(
        num_codes=32,
        embed_dim=8,
        z_channels=8,
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        image_size=16,
        quantizer=quantizer,
    )
    x = F.interpolate(images(4, size=2), size=16)  # blocky images a 32-code tokenizer can learn
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def deterministic_recon_loss() -> float:
        with torch.no_grad():
            return F.mse_loss(model.eval()(x)[0], x).item()

    before = deterministic_recon_loss()
    model.train()
    for _ in range(20):
        recon, quant_loss = model(x, temperature=1.0)
        loss = F.mse_loss(recon, x) + quant_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert deterministic_recon_loss() < 0.6 * before


def test_straight_through_reaches_the_encoder() -> None:
    for quantizer in ("gumbel", "vq"):
        model = tiny(quantizer).train()
        recon, quant_loss = model(images(1))
        (recon.square().mean() + quant_loss).backward()
        assert model.encoder.conv_in.weight.grad.abs().sum() > 0, quantizer


# ------------------------------------------------------------------------------------------ files


def test_save_load_round_trip_is_exact_and_atomic(tmp_path: Path) -> None:
    model = tiny("vq")
    model.save(tmp_path / "vq")
    loaded = VQGAN.load(tmp_path / "vq")
    assert loaded.arch == model.arch and not loaded.training
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert sorted(p.name for p in (tmp_path / "vq").iterdir()) == ["vqgan.json", "vqgan.safetensors"]
    with pytest.raises(CheckpointError, match="not a saved VQGAN.*VQGAN.save"):
        VQGAN.load(tmp_path / "missing")
    (tmp_path / "vq" / "vqgan.json").write_text('{"codes": 3}')
    with pytest.raises(CheckpointError, match="does not fit VQGAN"):
        VQGAN.load(tmp_path / "vq")


def test_failed_save_leaves_no_partial_file(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    def broken(tensors: dict[str, torch.Tensor], filename: str) -> None:
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("healthgpt.vqgan.model.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        tiny().save(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def taming_yaml(path: Path, target: str = "taming.models.vqgan.GumbelVQ") -> Path:
    """A model.yaml laid out like taming's (and HealthGPT's) configs, for the tiny architecture."""
    ddconfig = dict(
        double_z=False,
        z_channels=16,
        resolution=64,
        in_channels=3,
        out_ch=3,
        ch=16,
        ch_mult=[1, 2, 2, 4],
        num_res_blocks=1,
        attn_resolutions=[8],
        dropout=0.0,
    )
    params = dict(
        kl_weight=1e-8,
        embed_dim=16,
        n_embed=256,
        ddconfig=ddconfig,
        lossconfig={"target": "taming.modules.losses.vqperceptual.DummyLoss"},
        temperature_scheduler_config={"target": "taming.lr_scheduler.LambdaWarmUpCosineScheduler"},
    )
    model = {"base_learning_rate": 4.5e-6, "target": target, "params": params}
    path.write_text(yaml.safe_dump({"model": model}))
    return path


def lightning_ckpt(path: Path, state: dict[str, torch.Tensor], monkeypatch: MonkeyPatch) -> Path:
    """A PL 1.x-style checkpoint: callback states keyed by the ModelCheckpoint *class*, loss keys etc."""
    parts = LIGHTNING_MODULE.split(".")
    for i in range(1, len(parts) + 1):  # a fake pytorch_lightning, only so pickle can name the class
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MODULE})
    sys.modules[LIGHTNING_MODULE].ModelCheckpoint = model_checkpoint
    loss = {"loss.discriminator.main.0.weight": torch.ones(4, 3, 4, 4), "loss.logvar": torch.zeros(())}
    torch.save(
        {
            "epoch": 3,
            "global_step": 1000,
            "pytorch-lightning_version": "1.0.8",
            "callbacks": {model_checkpoint: {"best_model_score": torch.tensor(0.5), "best_model_path": "x.ckpt"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "betas": (0.5, 0.9)}]}],
            "lr_schedulers": [],
            "state_dict": {**state, **loss},
            "numpy_value": np.float64(0.25),
        },
        path,
    )
    monkeypatch.undo()  # loading happens without any pytorch_lightning module
    return path


def test_lightning_checkpoint_loads_without_lightning(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    source = tiny(seed=3)
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", source.state_dict(), monkeypatch)
    taming_yaml(tmp_path / "model.yaml")
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses it: the allow-list is exercised
        torch.load(ckpt, weights_only=True)
    loaded = load_taming_checkpoint(ckpt)
    assert not loaded.training and loaded.arch == source.arch
    codes = torch.randint(0, 256, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(codes), source.decode(codes))
    assert torch.equal(loaded.encode(images(2)), source.encode(images(2)))


def test_taming_log_layout_and_vqmodel_target(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "configs").mkdir()
    source = tiny("vq", seed=4)
    ckpt = lightning_ckpt(tmp_path / "checkpoints" / "last.ckpt", source.state_dict(), monkeypatch)
    taming_yaml(tmp_path / "configs" / "model.yaml", "taming.models.vqgan.VQModel")
    loaded = load_taming_checkpoint(ckpt)
    assert loaded.arch["quantizer"] == "vq"
    codes = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.decode(codes), source.decode(codes))


def test_missing_decoder_key_is_named(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    state = tiny().state_dict()
    del state["decoder.conv_out.weight"]
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", state, monkeypatch)
    with pytest.raises(CheckpointError, match=r"1 missing: decoder\.conv_out\.weight$"):
        load_taming_checkpoint(ckpt, taming_yaml(tmp_path / "other.yaml"))


def test_wrong_shape_names_key_and_both_shapes(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    state = tiny().state_dict()
    state["quantize.embed.weight"] = torch.zeros(255, 16)
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", state, monkeypatch)
    taming_yaml(tmp_path / "model.yaml")
    expected = r"quantize\.embed\.weight \(file \[255, 16\], model \[256, 16\]\)"
    with pytest.raises(CheckpointError, match=expected):
        load_taming_checkpoint(ckpt)


def test_unexpected_non_loss_key_is_refused(tmp_path: Path, monkeypatch: MonkeyPatch) -> None:
    state = {**tiny().state_dict(), "colorize": torch.zeros(3, 4, 1, 1)}
    ckpt = lightning_ckpt(tmp_path / "last.ckpt", state, monkeypatch)
    taming_yaml(tmp_path / "model.yaml")
    with pytest.raises(CheckpointError, match=r"1 unused: colorize$"):
        load_taming_checkpoint(ckpt)


class Payload:
    """A class outside the allow-list: unpickling it must never happen."""

    def __setstate__(self, state: object) -> None:
        raise AssertionError("unpickled a class outside the allow-list")


def test_classes_outside_the_allow_list_are_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": tiny().state_dict(), "payload": Payload()}, tmp_path / "last.ckpt")
    taming_yaml(tmp_path / "model.yaml")
    with pytest.raises(CheckpointError, match="allow-list.*Payload.*save only") as refused:
        load_taming_checkpoint(tmp_path / "last.ckpt")
    message = str(refused.value)  # one line, without torch's advice to unpickle with weights_only=False
    assert "\n" not in message and "weights_only=False" not in message, message


def test_bad_files_give_actionable_errors(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_taming_checkpoint(ckpt, taming_yaml(tmp_path / "model.yaml"))
    torch.save({"epoch": 1}, ckpt)
    with pytest.raises(CheckpointError, match="no 'state_dict'"):
        load_taming_checkpoint(ckpt)
    ckpt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="refused by the weights-only loader"):
        load_taming_checkpoint(ckpt)
    (tmp_path / "model.yaml").unlink()
    with pytest.raises(CheckpointError, match="no model.yaml.*pass yaml_path"):
        load_taming_checkpoint(ckpt)
    yaml_path = taming_yaml(tmp_path / "t.yaml", "taming.models.cond_transformer.Net2NetTransformer")
    with pytest.raises(CheckpointError, match="Net2NetTransformer' is not one of"):
        load_taming_checkpoint(ckpt, yaml_path)
    yaml_path.write_text("model: {target: taming.models.vqgan.GumbelVQ}\n")
    with pytest.raises(CheckpointError, match="not a taming model.yaml.*params"):
        load_taming_checkpoint(ckpt, yaml_path)
