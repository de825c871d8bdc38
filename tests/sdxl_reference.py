"""diffusers' SDXL components built from the tiny original-code fixture (`../shared/fixtures/sdxl`) with
diffusers' own single-file conversion, for the SDXL tests. diffusers picks SDXL's `text_time` addition
embedding only for the real context widths (2048 / 1280), so the tiny model's config says it explicitly."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

SDXL_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "sdxl"
BASE = SDXL_DIR / "sdxl-base-tiny.safetensors"


def base_config() -> dict:
    return json.loads((SDXL_DIR / "sdxl-base-tiny.json").read_text())


def sgm_config(cfg: dict | None = None) -> dict:
    return (cfg or base_config())["sgm_config"]


def diffusers_unet(ckpt: dict, original_config: dict):
    """UNet2DConditionModel from an original SDXL state dict (`model.diffusion_model.*`)."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    config = create_unet_diffusers_config_from_ldm(original_config, ckpt)
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    unet = UNet2DConditionModel(**config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(ckpt, config), strict=True)
    return unet.eval()


def fixture_ckpt() -> dict[str, torch.Tensor]:
    return load_file(str(BASE))


def diffusers_vae(ckpt: dict, original_config: dict):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint, create_vae_diffusers_config_from_ldm

    config = create_vae_diffusers_config_from_ldm(original_config, ckpt, scaling_factor=0.13025)
    vae = AutoencoderKL(**config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(ckpt, config), strict=True)
    return vae.eval()


def _flat(model, sd: dict) -> dict:
    """transformers >= 5 stores CLIPTextModel without the `text_model.` nesting."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return sd
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


def diffusers_text_encoders(ckpt: dict, te: list[dict], g_prefix: str = "conditioner.embedders.1.model."):
    """(CLIPTextModel or None, CLIPTextModelWithProjection) converted by diffusers from the original keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text = None
    if te[0]["kind"] == "hf_clip":
        c = te[0]
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=c["hidden_size"],
                intermediate_size=c["intermediate_size"],
                num_hidden_layers=c["num_hidden_layers"],
                num_attention_heads=c["num_attention_heads"],
                max_position_embeddings=77,
                hidden_act=c["hidden_act"],
            )
        )
        sd = convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer.")
        sd = {k: v for k, v in sd.items() if k.startswith("text_model.") and not k.endswith("position_ids")}
        text.load_state_dict(_flat(text, sd), strict=True)
    g = te[-1]
    text_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=49408,
            hidden_size=g["width"],
            intermediate_size=int(g["width"] * g["mlp_ratio"]),
            num_hidden_layers=g["layers"],
            num_attention_heads=g["heads"],
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=g["embed_dim"],
        )
    )
    sd = convert_open_clip_checkpoint(text_2, ckpt, prefix=g_prefix)
    text_2.load_state_dict(sd, strict=True)
    return (None if text is None else text.eval()), text_2.eval()


def tokenizers():
    """diffusers' SDXL tokenizers on the shipped CLIP BPE: `tokenizer` pads with <|endoftext|>, `tokenizer_2`
    with '!' (id 0)."""
    from transformers import CLIPTokenizer

    from latentgen.text.tokenizers import clip_bpe_vocab

    vocab, merges = clip_bpe_vocab()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
    tok.model_max_length = 77
    tok_2 = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token="!")
    tok_2.model_max_length = 77
    return tok, tok_2


def base_components() -> dict:
    """The fixture as diffusers StableDiffusionXL pipeline components (no scheduler)."""
    ckpt = fixture_ckpt()
    cfg = base_config()
    text, text_2 = diffusers_text_encoders(ckpt, cfg["text_encoders"])
    tok, tok_2 = tokenizers()
    return dict(
        unet=diffusers_unet(ckpt, sgm_config(cfg)),
        vae=diffusers_vae(ckpt, sgm_config(cfg)),
        text_encoder=text,
        text_encoder_2=text_2,
        tokenizer=tok,
        tokenizer_2=tok_2,
    )


def save_folder(components: dict, folder: Path, scheduler, **index) -> Path:
    """A diffusers SDXL folder (unet/, vae/, text_encoder[_2]/, tokenizer[_2]/, scheduler/)."""
    for name, mod in components.items():
        if mod is not None:
            mod.save_pretrained(folder / name, **({"safe_serialization": True} if hasattr(mod, "config") else {}))
    scheduler.save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", **index}))
    return folder


def tiny_refiner_unet(seed: int = 5):
    """A random diffusers UNet shaped as sd_xl_refiner, shrunk as the fixture README's refiner column: 4 levels
    (attention at 1 and 2), depth 2, 64 channels per head, context 128 (bigG alone), vector 128 + 5·256."""
    from diffusers import UNet2DConditionModel
    from helpers_models import randomize_

    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 64, 128, 128),
        layers_per_block=1,
        transformer_layers_per_block=2,
        attention_head_dim=(1, 1, 2, 2),
        cross_attention_dim=128,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=128 + 5 * 256,
    )
    return randomize_(unet, seed).eval()


# ---------------------------------------------------------------------------------------------------------
# diffusers → the original single-file layout (sgm's openaimodel names), written independently of latentgen

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0"}
_RESNET.update({"conv2": "out_layers.3", "conv_shortcut": "skip_connection"})
_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2"}
_TOP.update({"add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"})
_TOP.update({"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"})


def unet_to_original(unet) -> dict[str, torch.Tensor]:
    """A diffusers UNet2DConditionModel's weights under the original names (`model.diffusion_model.*`): down
    block i, layer j → input_blocks.{1 + i(L+1) + j} (.0 ResBlock, .1 SpatialTransformer), its downsampler
    → input_blocks.{(i+1)(L+1)}.0.op; up block i, layer j → output_blocks.{i(L+1) + j}, the upsampler after
    the attention (.2) or the ResBlock (.1); the transformers' inner names are the same in both."""
    per = unet.config.layers_per_block + 1

    def block(name: str) -> str:
        parts = name.split(".")
        kind, i = parts[0], int(parts[1]) if parts[0] != "mid_block" else 0
        if kind == "mid_block":
            sub, j, rest = parts[1], int(parts[2]), parts[3:]
            return ".".join([f"middle_block.{2 * j if sub == 'resnets' else 1}", *_inner(sub, rest)])
        sub, j, rest = parts[2], int(parts[3]), parts[4:]
        if kind == "down_blocks":
            if sub == "downsamplers":
                return ".".join([f"input_blocks.{(i + 1) * per}.0.op", *rest[1:]])
            return ".".join([f"input_blocks.{1 + i * per + j}.{0 if sub == 'resnets' else 1}", *_inner(sub, rest)])
        if sub == "upsamplers":
            has_attn = hasattr(unet.up_blocks[i], "attentions")
            return ".".join([f"output_blocks.{i * per + per - 1}.{2 if has_attn else 1}", *rest])
        return ".".join([f"output_blocks.{i * per + j}.{0 if sub == 'resnets' else 1}", *_inner(sub, rest)])

    out = {}
    for name, value in unet.state_dict().items():
        head, _, leaf = name.rpartition(".")
        key = _TOP[head] + "." + leaf if head in _TOP else block(name)
        out["model.diffusion_model." + key] = value.detach().clone()
    return out


def _inner(sub: str, rest: list[str]) -> list[str]:
    if sub == "resnets":
        return [_RESNET[rest[0]], *rest[1:]]
    return rest


def key_template(key: str) -> str:
    """A key with its block and layer numbers removed, to compare tiny and full-size layouts."""
    import re

    return re.sub(r"\.\d+(?=\.)", ".N", key)


def refiner_single_file(unet, path: Path) -> Path:
    """A tiny sd_xl_refiner in the original single-file layout: `unet` (diffusers) converted, the fixture's
    first stage, and its bigG tower moved to `conditioner.embedders.0` (the refiner's only text encoder), as
    the refiner's components of `tiny_refiner_parts` are."""
    from safetensors.torch import save_file

    ckpt = fixture_ckpt()
    sd = unet_to_original(unet)
    sd.update({k: v for k, v in ckpt.items() if k.startswith("first_stage_model.")})
    g = "conditioner.embedders.1."
    sd.update({"conditioner.embedders.0." + k[len(g) :]: v for k, v in ckpt.items() if k.startswith(g)})
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def inpaint_single_file(path: Path) -> torch.Tensor:
    """The fixture with a random 9-channel first convolution ([latent, mask, masked-image latent]): an SDXL
    inpainting single file. Returns that convolution's weight."""
    from safetensors.torch import save_file

    sd = fixture_ckpt()
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = torch.randn(sd[key].shape[0], 9, 3, 3, generator=torch.Generator().manual_seed(3)) / 9
    save_file(sd, str(path))
    return sd[key]


def tiny_refiner(components: dict, folder: Path, scheduler) -> dict:
    """A tiny random refiner (diffusers classes) sharing the fixture's VAE and bigG, saved as a diffusers folder;
    returns its pipeline components (no CLIP-L)."""
    parts = dict(
        unet=tiny_refiner_unet(),
        vae=components["vae"],
        text_encoder_2=components["text_encoder_2"],
        tokenizer_2=components["tokenizer_2"],
    )
    save_folder(parts, folder, scheduler, requires_aesthetics_score=True)
    return {**parts, "text_encoder": None, "tokenizer": None}
