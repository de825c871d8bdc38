"""The SDXL conditioner (CLIP-L + OpenCLIP bigG, pooled vector, size embeddings, zeroed uncond) against the
original Stability code's outputs (fixture), and its config read from the file alone."""

from __future__ import annotations

import pytest
import torch
from helpers_models import max_scaled_err, strip_prefix
from safetensors.torch import load_file
from sdxl_reference import BASE, SDXL_DIR, base_config, fixture_ckpt

from latentgen.errors import CheckpointError, InputError
from latentgen.text.sdxl import SDXLCondConfig, SDXLConditioner

pytestmark = [
    pytest.mark.skipif(not BASE.exists(), reason=f"SDXL fixtures not found at {SDXL_DIR}"),
    pytest.mark.filterwarnings("ignore::latentgen.text.tokenizers.TruncationWarning"),
]


@pytest.fixture(scope="module")
def fixture():
    sd = strip_prefix(fixture_ckpt(), "conditioner.")
    model = SDXLConditioner(SDXLCondConfig.from_state_dict(sd)).eval()
    model.load_original_state_dict(sd)
    return model, sd, load_file(str(SDXL_DIR / "sdxl-base-tiny.orig-ref.safetensors"))


def test_config_from_the_file_alone(fixture):
    model, _, _ = fixture
    cfg, te = model.cfg, base_config()["text_encoders"]
    assert not cfg.refiner and cfg.context_dim == 192 and cfg.adm_in_channels == 1664
    assert (cfg.clip_l.hidden_size, cfg.clip_l.num_hidden_layers, cfg.clip_l.num_attention_heads) == (64, 3, 1)
    assert cfg.clip_l.hidden_act == te[0]["hidden_act"] and cfg.bigg.hidden_act == "gelu"
    assert (cfg.bigg.hidden_size, cfg.bigg.num_attention_heads, cfg.projection_dim) == (128, 2, 128)
    assert SDXLCondConfig.from_dict(cfg.to_dict()) == cfg


def test_tokenizers_match_the_original(fixture):
    model, _, ref = fixture
    prompts = base_config()["orig_ref"]["text_prompts"]
    assert torch.equal(model.tokenize_l(prompts), ref["in.text.ids_l"])
    assert torch.equal(model.tokenize_g(prompts), ref["in.text.ids_g"])


def test_encoders_match_the_original(fixture):
    model, _, ref = fixture
    with torch.no_grad():
        hidden_l = model.encode_l(ref["in.text.ids_l"])
        hidden_g, pooled = model.encode_g(ref["in.text.ids_g"])
    assert max_scaled_err(hidden_l, ref["out.text.clip_l.hidden"]) <= 1e-5
    assert max_scaled_err(hidden_g, ref["out.text.open_clip.penultimate"]) <= 1e-5
    assert max_scaled_err(pooled, ref["out.text.open_clip.pooled"]) <= 1e-5


def test_conditioner_and_zero_uncond_match_the_original(fixture):
    """The plain prompts (the original code truncates the third, long one with A1111 syntax, which latentgen reads
    as A1111 does: tests/test_sdxl_prompts.py)."""
    model, _, ref = fixture
    cond = model.condition(base_config()["orig_ref"]["text_prompts"][:2], ref["in.cond.time_ids"][:2])
    assert max_scaled_err(cond["context"], ref["out.cond.crossattn"][:2]) <= 1e-5
    assert max_scaled_err(cond["y"], ref["out.cond.vector"][:2]) <= 1e-5
    uc = model.zeros_like_text(cond, model.cfg.projection_dim)
    assert torch.equal(uc["context"], ref["out.cond.uc_zero.crossattn"][:2])
    assert max_scaled_err(uc["y"], ref["out.cond.uc_zero.vector"][:2]) <= 1e-5


def test_state_dict_round_trip_and_errors(fixture):
    model, sd, _ = fixture
    out = model.original_state_dict()
    assert set(out) == {k for k in sd if not k.endswith(("position_ids", "logit_scale"))}
    assert all(torch.equal(out[k], sd[k]) for k in out)
    fresh = SDXLConditioner(model.cfg)
    with pytest.raises(CheckpointError, match="text_projection"):
        fresh.load_original_state_dict({k: v for k, v in sd.items() if not k.endswith("text_projection")})
    with pytest.raises(CheckpointError, match="embedders"):
        fresh.load_original_state_dict({k: v for k, v in sd.items() if k.startswith("embedders.1.")})
    with pytest.raises(InputError, match="target-size"):
        model.time_ids((64, 64), (0, 0))
