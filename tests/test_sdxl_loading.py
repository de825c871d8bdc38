"""SDXL files are recognised from keys and shapes alone: the full-size base and refiner key lists (from the
original code) load strictly on the meta device (nothing allocated), our modules hold exactly those names, and
our own SDXL files round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from sdxl_reference import BASE, SDXL_DIR, key_template, refiner_single_file, tiny_refiner_unet

from latentgen.errors import CheckpointError
from latentgen.loading.bundle import bundle_from_raw, describe, load_model, save_model
from latentgen.loading.files import RawCheckpoint

pytestmark = pytest.mark.skipif(not BASE.exists(), reason=f"SDXL fixtures not found at {SDXL_DIR}")


def _meta_raw(name):
    shapes = json.loads((SDXL_DIR / name).read_text())
    tensors = {
        k: torch.empty(s, device="meta", dtype=torch.int64 if k.endswith("position_ids") else torch.float16)
        for k, s in shapes.items()
    }
    return RawCheckpoint(str(SDXL_DIR / name), "original", tensors), shapes


@pytest.mark.parametrize(
    "keys,variant,context,adm,depth",
    [
        ("sdxl-base-keys.json", "sdxl-base", 2048, 2816, (0, 2, 10)),
        ("sdxl-refiner-keys.json", "sdxl-refiner", 1280, 2560, 4),
    ],
)
def test_full_size_key_lists_load_strictly(keys, variant, context, adm, depth):
    raw, shapes = _meta_raw(keys)
    bundle = bundle_from_raw(raw, device=None, dtype=None)
    d = describe(bundle)
    assert (d["family"], d["variant"], d["context_dim"], bundle.config.unet.adm_in_channels) == (
        "sdxl",
        variant,
        context,
        adm,
    )
    unet_numel = sum(torch.Size(s).numel() for k, s in shapes.items() if k.startswith("model.diffusion_model."))
    assert d["params"]["unet"] == unet_numel
    assert bundle.config.unet.transformer_depth == depth
    assert all(p.device.type == "meta" for p in bundle.unet.parameters())  # nothing allocated
    ours = {"model.diffusion_model." + k: list(v.shape) for k, v in bundle.unet.state_dict().items()}
    ours.update({"first_stage_model." + k: list(v.shape) for k, v in bundle.first_stage.state_dict().items()})
    ours.update({"conditioner." + k: list(v.shape) for k, v in bundle.cond.original_state_dict().items()})
    unused = ("denoiser.sigmas", "position_ids", "logit_scale")
    assert ours == {k: v for k, v in shapes.items() if not k.endswith(unused)}


def test_tiny_refiner_single_file_has_the_original_layout(tmp_path):
    """The test helper's tiny sd_xl_refiner: the names of the full-size refiner (up to block and layer numbers),
    which diffusers' own single-file converter maps back to the diffusers UNet it was made from; latentgen reads
    it from the file alone as a refiner."""
    pytest.importorskip("diffusers")
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_refiner_unet()
    path = refiner_single_file(unet, tmp_path / "refiner.safetensors")
    sd = load_file(str(path))
    full = json.loads((SDXL_DIR / "sdxl-refiner-keys.json").read_text())
    assert {key_template(k) for k in sd} == {key_template(k) for k in full} - {"denoiser.sigmas"}
    back = convert_ldm_unet_checkpoint(sd, dict(unet.config))
    want = unet.state_dict()
    assert back.keys() == want.keys() and all(torch.equal(back[k], want[k]) for k in want)
    bundle = load_model(str(path))
    d = describe(bundle)
    assert (d["variant"], d["context_dim"], bundle.config.unet.adm_in_channels) == ("sdxl-refiner", 128, 1408)
    assert bundle.config.unet.num_head_channels == 64 and bundle.config.prediction_source == "default"


def test_own_file_round_trip(tmp_path):
    bundle = load_model(str(BASE))
    path = tmp_path / "own.safetensors"
    save_model(path, bundle.config, bundle.unet, bundle.first_stage, bundle.cond)
    again = load_model(str(path))
    mine, theirs = bundle.config.to_dict(), again.config.to_dict()
    assert theirs.pop("prediction_source") == "metadata" and again.format == "latentgen"
    assert {k: v for k, v in mine.items() if k != "prediction_source"} == theirs
    sd = load_file(str(path))
    assert all(torch.equal(sd["conditioner." + k], v) for k, v in bundle.cond.original_state_dict().items())


def test_mixed_parts_are_refused(tmp_path):
    sd = load_file(str(BASE))
    sd = {k: v for k, v in sd.items() if not k.startswith("conditioner.embedders.0.")}  # no CLIP-L: "a refiner"
    save_file({k.replace("embedders.1.", "embedders.0."): v for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="label_emb takes 1664 channels but the refiner conditioner gives 1408"):
        load_model(str(tmp_path / "m.safetensors"))


def test_fp16_file_low_memory_equals_full_weights(tmp_path):
    """An fp16 SDXL file computed in fp32 on the CPU: kept as stored and upcast on use (--low-memory) gives the
    same image as upcast at load (--full-weights), to float32 rounding (oneDNN's matmul and the small convolutions
    as one matrix product against F.linear and F.conv2d)."""
    from latentgen import pipelines

    sd = load_file(str(BASE))
    path = tmp_path / "fp16.safetensors"
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(path))
    st = pipelines.Settings(steps=2, cfg=5.0)
    low, full = load_model(str(path), low_memory=True), load_model(str(path), low_memory=False)
    assert any(p.dtype == torch.float16 for p in low.unet.parameters())
    a = pipelines.txt2img(low, ["a cube"], [""], [4], 64, 64, st)
    b = pipelines.txt2img(full, ["a cube"], [""], [4], 64, 64, st)
    torch.testing.assert_close(a, b, rtol=0, atol=2e-5)
