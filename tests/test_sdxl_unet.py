"""The SDXL UNet (per-level transformer depth, 64 channels per head, label_emb MLP on the vector) against the
original Stability code's outputs (fixture) and diffusers' UNet2DConditionModel; latents of any size."""

from __future__ import annotations

import pytest
import torch
from helpers_models import UNET_PREFIX, max_scaled_err, strip_prefix
from safetensors.torch import load_file
from sdxl_reference import BASE, SDXL_DIR, diffusers_unet, fixture_ckpt, sgm_config

from latentgen.errors import ConfigError, InputError
from latentgen.unet import UNetConfig, UNetModel

pytestmark = pytest.mark.skipif(not BASE.exists(), reason=f"SDXL fixtures not found at {SDXL_DIR}")


@pytest.fixture(scope="module")
def fixture():
    ckpt = fixture_ckpt()
    sd = strip_prefix(ckpt, UNET_PREFIX)
    model = UNetModel(UNetConfig.from_state_dict(sd)).eval()
    model.load_state_dict(sd, strict=True)
    ref = load_file(str(SDXL_DIR / "sdxl-base-tiny.orig-ref.safetensors"))
    return model, diffusers_unet(ckpt, sgm_config()), ref


def test_config_read_from_the_file_alone(fixture):
    model, _, _ = fixture
    declared = UNetConfig.from_ldm_params(sgm_config()["model"]["params"]["network_config"]["params"])
    assert model.config == declared
    assert model.config.transformer_depth == (0, 1, 2) and model.config.num_classes == "sequential"
    assert model.config.heads(128) == (2, 64)


def test_unet_matches_original_code(fixture):
    model, _, ref = fixture
    with torch.no_grad():
        out = model(ref["in.unet.x"], ref["in.unet.t"], context=ref["in.unet.context"], y=ref["in.unet.y"])
    assert max_scaled_err(out, ref["out.unet.out"]) <= 1e-5


def _added(ref, rows):
    return {"text_embeds": ref["in.unet.text_embeds"][rows], "time_ids": ref["in.unet.time_ids"][rows]}


@pytest.mark.parametrize("hw", [(8, 16), (9, 13), (5, 7)], ids=["8x16", "odd-9x13", "odd-5x7"])
def test_unet_matches_diffusers_at_any_size(fixture, hw):
    """diffusers pads nothing: where a level halves an odd side it upsamples to the skip's size."""
    model, theirs_unet, ref = fixture
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, *hw, generator=g)
    t = torch.tensor([999.0, 37.5])
    with torch.no_grad():
        theirs = theirs_unet(x, t, ref["in.unet.context"], added_cond_kwargs=_added(ref, [0, 1])).sample
        ours = model(x, t, context=ref["in.unet.context"], y=ref["in.unet.y"])
    assert ours.shape == x.shape
    assert max_scaled_err(ours, theirs) <= 1e-5


def test_vector_is_required_and_checked():
    cfg = UNetConfig.from_ldm_params(sgm_config()["model"]["params"]["network_config"]["params"])
    model = UNetModel(cfg)
    with pytest.raises(InputError, match="vector y"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1.0]), context=torch.randn(1, 77, 192))
    with pytest.raises(ConfigError, match="adm_in_channels"):
        UNetConfig.from_dict({**cfg.to_dict(), "adm_in_channels": None})
    with pytest.raises(ConfigError, match="one per level"):
        UNetConfig.from_dict({**cfg.to_dict(), "transformer_depth": [1, 2]})
    assert UNetConfig.from_dict(cfg.to_dict()) == cfg
