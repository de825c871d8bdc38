"""diffusers folders (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`): their weights mapped one way
into the original single-file names, their configs into hints for detection."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError
from .layout import COND_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX
from .safetensors import PICKLE_SUFFIXES, _refuse_pickle, read_safetensors
from .sdxl import diffusers_text_to_original


def _diffusers_unet_to_original(sd: dict, cfg: dict) -> dict:
    """diffusers UNet2DConditionModel names → openaimodel UNetModel names (the inverse of
    diffusers' convert_ldm_unet_checkpoint). Transformer internals share their names."""
    nrb = cfg.get("layers_per_block") or 1 + max(
        int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k))
    )
    fixed = {
        "conv_in.": "input_blocks.0.0.",
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "class_embedding.": "label_emb.",
        "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's text_time embedding of the vector
        "add_embedding.linear_2.": "label_emb.0.2.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.",
        "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    resnet = {
        "norm1.": "in_layers.0.",
        "conv1.": "in_layers.2.",
        "time_emb_proj.": "emb_layers.1.",
        "norm2.": "out_layers.0.",
        "conv2.": "out_layers.3.",
        "conv_shortcut.": "skip_connection.",
    }
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    out = {}
    for key, value in sd.items():
        if m := re.match(r"(.*resnets\.\d+\.)(.*)", key):  # ResBlock internals first
            head, rest = m.groups()
            for a, b in resnet.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            key = head + rest
        new = next((b + key[len(a) :] for a, b in fixed.items() if key.startswith(a)), None)
        if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
            side, i, kind, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
            n = 1 + i * (nrb + 1) + j if side == "down" else i * (nrb + 1) + j
            new = f"{'input' if side == 'down' else 'output'}_blocks.{n}.{0 if kind == 'resnets' else 1}.{rest}"
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
            new = f"input_blocks.{(int(m.group(1)) + 1) * (nrb + 1)}.0.op.{m.group(2)}"
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
            i = int(m.group(1))
            new = f"output_blocks.{i * (nrb + 1) + nrb}.{2 if i in up_has_attn else 1}.conv.{m.group(2)}"
        if new is None:
            raise CheckpointError(f"diffusers unet: unexpected key {key}")
        out[new] = value
    return out


def _diffusers_vae_to_original(sd: dict, n_levels: int) -> dict:
    """diffusers AutoencoderKL / VQModel names → CompVis Encoder/Decoder names."""
    out = {}
    attn = {
        "group_norm.": "norm.",
        "to_q.": "q.",
        "to_k.": "k.",
        "to_v.": "v.",
        "to_out.0.": "proj_out.",
        "query.": "q.",
        "key.": "k.",
        "value.": "v.",
        "proj_attn.": "proj_out.",
    }
    for key, value in sd.items():
        new = key
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        if m := re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)", new):
            level = n_levels - 1 - int(m.group(1))
            part = "block." if m.group(2) == "resnets" else "upsample."
            new = f"decoder.up.{level}.{part}{m.group(3)}"
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1.", new)
        new = re.sub(r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2.", new)
        new = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", new)
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        if m := re.match(r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)", new):
            rest = m.group(2)
            for a, b in attn.items():
                if rest.startswith(a):
                    rest = b + rest[len(a) :]
                    break
            new = f"{m.group(1)}.mid.attn_1.{rest}"
            if value.ndim == 2:  # Linear → 1x1 conv
                value = value[:, :, None, None]
        out[new] = value
    return out


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable JSON ({e})") from e


def read_diffusers_folder(folder: Path) -> tuple[dict, dict]:
    """A diffusers model folder → (original-layout state dict, hints for detection)."""
    sd, hints = {}, {}
    parts = {
        "unet": "diffusion_pytorch_model",
        "vae": "diffusion_pytorch_model",
        "vqvae": "diffusion_pytorch_model",
        "text_encoder": "model",
        "text_encoder_2": "model",
    }
    texts = {}
    for sub, stem in parts.items():
        d = folder / sub
        if not d.is_dir():
            continue
        f = _first_existing(d, [f"{stem}.safetensors", f"{stem}.fp16.safetensors"])
        if f is None:
            pickles = [p.name for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickles:
                _refuse_pickle(d / pickles[0])
            raise CheckpointError(f"{d}: no {stem}.safetensors")
        tensors, _ = read_safetensors(f)
        cfg = _read_json(d / "config.json") if (d / "config.json").is_file() else {}
        if sub == "unet":
            sd.update({UNET_PREFIX + k: v for k, v in _diffusers_unet_to_original(tensors, cfg).items()})
            hints["unet"] = cfg
        elif sub in ("vae", "vqvae"):
            n_levels = len(cfg.get("block_out_channels", [])) or 1 + max(
                int(m.group(1)) for k in tensors if (m := re.match(r"encoder\.down_blocks\.(\d+)", k))
            )
            sd.update({FIRST_STAGE_PREFIX + k: v for k, v in _diffusers_vae_to_original(tensors, n_levels).items()})
            hints["vae"] = cfg
        else:
            texts[sub] = tensors
            hints[sub] = cfg
    if "text_encoder_2" in texts:  # SDXL: conditioner.embedders.*
        sd.update(diffusers_text_to_original(texts.get("text_encoder"), texts["text_encoder_2"]))
        hints["te_heads"] = {
            k: hints[sub]["num_attention_heads"]
            for k, sub in (("clip_l", "text_encoder"), ("bigg", "text_encoder_2"))
            if "num_attention_heads" in hints.get(sub, {})
        }
    elif "text_encoder" in texts:
        sd.update({COND_PREFIX + "transformer." + k: v for k, v in texts["text_encoder"].items()})
    if "unet" not in hints:
        raise CheckpointError(f"{folder}: not a diffusers model folder (no unet/ with safetensors weights)")
    for name, rel in (
        ("scheduler", "scheduler/scheduler_config.json"),
        ("model_index", "model_index.json"),
        ("low_res_scheduler", "low_res_scheduler/scheduler_config.json"),
    ):  # the x4 upscaler's
        if (folder / rel).is_file():
            hints[name] = _read_json(folder / rel)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = folder / "tokenizer" / name
        if p.is_file():
            pad = _read_json(p).get("pad_token")
            pad = pad.get("content") if isinstance(pad, dict) else pad
            if pad is not None:
                hints["pad_token"] = pad
    return sd, hints
