"""Original configs as published (CompVis/latent-diffusion, CompVis/stable-diffusion, Stability-AI/stablediffusion,
Stability-AI/generative-models): every variant of the model class, `cond_stage_config`, `conditioning_key` and
`first_stage_config` is accepted and read as its checkpoint is, or refused with one line naming the part.

The configs are written here in the published files' shapes, with the tiny models' sizes."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_model

from latentgen.errors import ConfigError
from latentgen.loading.bundle import load_model
from latentgen.loading.original_config import ldm_params, read_config_file
from latentgen.loading.safetensors import read_safetensors, write_safetensors

LDM = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
KL = "ldm.models.autoencoder.AutoencoderKL"


def original_layout(kind: str, tmp_path):
    """A tiny random model of `kind` as an original single file (no latentgen metadata) and as our own file."""
    ours = random_model(kind, tmp_path / f"{kind}.safetensors")
    tensors, _ = read_safetensors(ours)
    plain = tmp_path / f"{kind}-original.safetensors"
    write_safetensors(plain, tensors, {})
    return ours, plain


def config_of(bundle, cond_stage_config, conditioning_key, **extra) -> dict:
    """The original config of a loaded bundle's architecture, in the published layout."""
    cfg = bundle.config
    params = {
        "linear_start": cfg.linear_start,
        "linear_end": cfg.linear_end,
        "timesteps": cfg.timesteps,
        "scale_factor": cfg.scale_factor,
        "parameterization": cfg.prediction,
        "unet_config": {"target": UNET, "params": cfg.unet.to_dict()},
        "first_stage_config": {"target": KL, "params": cfg.first_stage.to_ldm_params()},
        "cond_stage_config": cond_stage_config,
        **({"conditioning_key": conditioning_key} if conditioning_key else {}),
        **extra,
    }
    return {"model": {"target": LDM, "params": params}}


def same_model(a, b) -> None:
    """Same architecture and the same UNet output on one input (to float32 rounding: the two files' tensors are
    laid out differently in memory; a wrong head count differs by O(1))."""
    assert a.config.unet == b.config.unet and a.config.first_stage == b.config.first_stage
    assert (a.config.cond.kind, a.config.concat, a.config.conditioning_key) == (
        b.config.cond.kind,
        b.config.concat,
        b.config.conditioning_key,
    )
    torch.manual_seed(0)
    c = a.config.unet
    x = torch.randn(1, c.in_channels, 8, 8)
    t = torch.tensor([500])
    ctx = torch.randn(1, 1, c.context_dim) if c.context_dim else None
    with torch.no_grad():
        assert (a.unet(x, t, context=ctx) - b.unet(x, t, context=ctx)).abs().max() < 1e-5


@pytest.mark.parametrize(
    "kind, cond_stage, key",
    [
        ("uncond", "__is_unconditional__", None),  # celebahq / ffhq / lsun configs
        ("sr", {"target": "torch.nn.Identity"}, "concat"),  # models/ldm/bsr_sr
        (
            "class",
            {"target": "ldm.modules.encoders.modules.ClassEmbedder", "params": {"n_classes": 5, "embed_dim": 32}},
            "crossattn",
        ),  # cin256-v2
    ],
)
def test_published_variants_load_as_their_checkpoint(tmp_path, kind, cond_stage, key):
    """The same weights with the original config, and as our own file with its config: the same model. Without the
    config the head count is a guess that differs (the tiny models use 2 heads)."""
    ours, plain = original_layout(kind, tmp_path)
    mine = load_model(str(ours))
    cfg = config_of(mine, cond_stage, key)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    same_model(load_model(str(plain), config=str(path)), mine)
    assert load_model(str(plain)).config.unet != mine.config.unet


def test_yaml_config_is_read_with_safe_load(tmp_path):
    yaml = pytest.importorskip("yaml")
    ours, plain = original_layout("uncond", tmp_path)
    mine = load_model(str(ours))
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_of(mine, "__is_unconditional__", None)))
    same_model(load_model(str(plain), config=str(path)), mine)
    path.write_text("model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(path)
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(path)


def sgm_form(ldm_config: dict) -> dict:
    """generative-models' configs/inference/sd_2_1*.yaml layout of the same model."""
    p = ldm_config["model"]["params"]
    v = p.get("parameterization") == "v"
    scaling = "VScaling" if v else "EpsScaling"
    return {
        "model": {
            "target": "sgm.models.diffusion.DiffusionEngine",
            "params": {
                "scale_factor": p["scale_factor"],
                "disable_first_stage_autocast": True,
                "denoiser_config": {
                    "target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser",
                    "params": {
                        "num_idx": 1000,
                        "scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"},
                        "discretization_config": {
                            "target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"
                        },
                    },
                },
                "network_config": {
                    "target": "sgm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {**p["unet_config"]["params"], "spatial_transformer_attn_type": "softmax-xformers"},
                },
                "conditioner_config": {
                    "target": "sgm.modules.GeneralConditioner",
                    "params": {
                        "emb_models": [
                            {
                                "is_trainable": False,
                                "input_key": "txt",
                                "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                "params": {"freeze": True, "layer": "penultimate"},
                            }
                        ]
                    },
                },
                "first_stage_config": {
                    "target": "sgm.models.autoencoder.AutoencoderKL",
                    **{k: v for k, v in p["first_stage_config"].items() if k != "target"},
                },
            },
        }
    }


def test_generative_models_sd21_config_equals_the_ldm_one(fixtures_dir, fixture_config, tmp_path):
    """The sd2-tiny fixture (made by the original code) with its ldm config and with the same model written as a
    generative-models DiffusionEngine config."""
    ldm = fixture_config("sd2-tiny")["ldm_config"]
    path = str(fixtures_dir / "sd2-tiny.safetensors")
    a = load_model(path, config=ldm)
    b = load_model(path, config=sgm_form(ldm))
    same_model(a, b)
    assert a.config.cond == b.config.cond and b.config.prediction == "v" and b.config.prediction_source == "config"
    assert (b.config.linear_start, b.config.linear_end, b.config.scale_factor) == (0.00085, 0.012, 0.18215)


def _base(**over) -> dict:
    params = {
        "unet_config": {"target": UNET, "params": {}},
        "first_stage_config": {"target": KL, "params": {}},
        "cond_stage_config": "__is_unconditional__",
    }
    params.update(over)
    return {"model": {"target": over.pop("_target", LDM), "params": params}}


def _sgm(network="sgm.modules.diffusionmodules.openaimodel.UNetModel", embedders=(), scaling="EpsScaling") -> dict:
    return {
        "model": {
            "target": "sgm.models.diffusion.DiffusionEngine",
            "params": {
                "network_config": {"target": network, "params": {}},
                "conditioner_config": {"params": {"emb_models": [{"target": t} for t in embedders]}},
                "denoiser_config": {
                    "params": {"scaling_config": {"target": f"sgm.modules.diffusionmodules.denoiser_scaling.{scaling}"}}
                },
                "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKL", "params": {}},
            },
        }
    }


SGM = "sgm.modules.encoders.modules."
REFUSED = [
    ({"model": {"target": "ldm.models.diffusion.ddpm.DDPM", "params": {}}}, "ldm.models.diffusion.ddpm.DDPM"),
    ({"model": {"target": "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion", "params": {}}}, "depth"),
    (
        {"model": {"target": "ldm.models.diffusion.ddpm.ImageEmbeddingConditionedLatentDiffusion", "params": {}}},
        "unCLIP",
    ),
    ({"model": {"target": "my.own.Diffusion", "params": {}}}, "model target 'my.own.Diffusion'"),
    (_base(first_stage_config={"target": "ldm.models.autoencoder.IdentityFirstStage", "params": {}}), "pixel-space"),
    (_base(first_stage_config={"target": "sgm.models.autoencoder.AutoencodingEngine", "params": {}}), "Autoencoding"),
    (_base(first_stage_config={"target": "x.Other", "params": {}}), "first_stage_config target 'x.Other'"),
    (_base(unet_config={"target": "x.UNet", "params": {}}), "unet_config target 'x.UNet'"),
    (_base(cond_stage_config="__is_first_stage__"), "__is_first_stage__"),
    (
        _base(cond_stage_config={"target": "ldm.modules.encoders.modules.SpatialRescaler"}, conditioning_key="concat"),
        "SpatialRescaler",
    ),
    (
        _base(
            cond_stage_config={
                "target": "ldm.modules.encoders.modules.BERTEmbedder",
                "params": {"use_tokenizer": False},
            }
        ),
        "use_tokenizer: false",
    ),
    (_base(cond_stage_config={"target": "torch.nn.Identity"}, conditioning_key="crossattn"), "torch.nn.Identity"),
    (_base(conditioning_key="crossattn-adm"), "conditioning_key 'crossattn-adm'"),
    (_base(cond_stage_config=7), "cond_stage_config must be a mapping"),
    (_base(unet_config="UNetModel"), "unet_config must be a mapping"),
    ({"model": {"target": LDM, "params": {"unet_config": {"target": UNET, "params": {}}}}}, "first_stage_config"),
    ({"model": {"params": {}}}, "unet_config"),
    ([1, 2], "not a mapping"),
    (
        _sgm("sgm.modules.diffusionmodules.video_model.VideoUNet", [SGM + "FrozenOpenCLIPImagePredictionEmbedder"]),
        "VideoUNet",
    ),
    (
        _sgm(embedders=[SGM + "FrozenCLIPEmbedder", SGM + "FrozenOpenCLIPEmbedder2", SGM + "ConcatTimestepEmbedderND"]),
        "SDXL needs no --config",
    ),
    (_sgm(embedders=[SGM + "FrozenOpenCLIPEmbedder"], scaling="VScalingWithEDMcNoise"), "VScalingWithEDMcNoise"),
    (_sgm(embedders=[SGM + "FrozenOpenCLIPImageEmbedder"]), "FrozenOpenCLIPImageEmbedder"),
]


@pytest.mark.parametrize("config, names", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_unsupported_parts_are_refused_in_one_line(config, names):
    with pytest.raises(ConfigError) as err:
        ldm_params(config)
    msg = str(err.value)
    assert names in msg and "\n" not in msg, msg


def test_refusal_reaches_the_cli_as_one_line(tmp_path):
    from typer.testing import CliRunner

    from latentgen.cli import app

    _, plain = original_layout("uncond", tmp_path)
    path = tmp_path / "depth.json"
    path.write_text(json.dumps({"model": {"target": "ldm.models.diffusion.ddpm.LatentDepth2ImageDiffusion"}}))
    r = CliRunner().invoke(app, ["info", str(plain), "--config", str(path)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "depth" in r.stderr, r.stderr


def test_info_describes_what_the_weights_show_when_heads_are_unknown(fixtures_dir, fixture_config, tmp_path):
    """The sd2-tiny fixture uses 8 channels a head, not SD 2.x's 64: without its config `info` still describes it
    (parameters counted from the tensors, equal to the modules built with the config) and names what it cannot
    know; the generation commands refuse in one line that names --config."""
    from typer.testing import CliRunner

    from latentgen.cli import app
    from latentgen.loading.bundle import describe

    path = str(fixtures_dir / "sd2-tiny.safetensors")
    r = CliRunner().invoke(app, ["info", path, "--json"])
    assert r.exit_code == 0, r.stderr
    d = json.loads(r.stdout)
    known = describe(load_model(path, config=fixture_config("sd2-tiny")))
    assert d["params"] == known["params"] and d["unknown"] == ["attention heads"]
    assert (d["family"], d["conditioning"], d["context_dim"]) == ("sd2", "open_clip", known["context_dim"])
    assert any("--config" in n for n in d["notes"])
    r = CliRunner().invoke(app, ["info", path])
    assert r.exit_code == 0 and "unknown       attention heads" in r.stdout
    r = CliRunner().invoke(app, ["txt2img", "x", "--model", path, "--steps", "1", "--out", str(tmp_path / "x.png")])
    assert r.exit_code == 2 and "--config" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("latentgen: error:")
    assert not (tmp_path / "x.png").exists()
