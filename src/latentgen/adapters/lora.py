"""LoRA and LyCORIS weight deltas, merged into a loaded model and removed exactly.

Formats (each module's keys sit under one prefix; the prefix names the layer):

- kohya LoRA / LoCon: ``lora_unet_*`` / ``lora_te_*`` with ``.lora_down.weight``, ``.lora_up.weight``, optional
  ``.lora_mid.weight`` (CP decomposition of a conv) and ``.alpha``: ΔW = up·down · alpha/rank (Hu et al. 2021,
  arXiv 2106.09685, Eq. 3 with A1111's alpha/rank scale). Convolutions: down [r, in, kh, kw], up [out, r, 1, 1].
- LyCORIS LoHa (Hyeon-Woo et al. 2022, FedPara, arXiv 2108.06098): ΔW = (w1a·w1b) ⊙ (w2a·w2b) · alpha/rank,
  rank = rows of ``hada_w1_b``; with ``hada_t1/t2`` each factor is the Tucker product t ×₁ wa ×₂ wb.
- LyCORIS LoKr (Yeh et al. 2023, arXiv 2309.14859): ΔW = w1 ⊗ w2 (Kronecker), each factor stored whole
  (``lokr_w1``) or as a product (``lokr_w1_a``·``lokr_w1_b``; ``lokr_t2`` Tucker); scale alpha/rank with rank = rows
  of ``lokr_w1_b`` (else of ``lokr_w2_b``); with both factors whole alpha is ignored (scale 1), as LyCORIS does.
- full difference: ``.diff`` (and ``.diff_b`` for the bias), scale 1.
- diffusers / PEFT: ``unet.`` / ``text_encoder.`` (SDXL also ``text_encoder_2.``) prefixes with ``lora_A`` /
  ``lora_B`` (``.default`` adapter names too), ``lora.down`` / ``lora.up`` or ``lora_linear_layer.down`` / ``.up``;
  alpha from ``.alpha`` keys, else the rank (scale 1).

Layer paths may use diffusers' UNet names (``down_blocks_1_attentions_0_...``, SDXL's ``add_embedding_linear_1``)
or the original ones (``input_blocks_4_1_...``, ``label_emb_0_0``); text-encoder paths use transformers' names.
SDXL: ``lora_te1_`` / ``text_encoder.`` is CLIP ViT-L, ``lora_te2_`` / ``text_encoder_2.`` OpenCLIP bigG (held in the
CLIP layout, with separate q/k/v projections, so its names are CLIP's); the refiner has bigG alone.
The scale is applied once, as in the LyCORIS forward pass and A1111 (LyCORIS' own merge path applies it twice).

Merging: for each layer the base weight Parameter is set aside and replaced by base + Σ multiplier·ΔW computed in
float32 and stored in the weight's own dtype. Restoring puts the base Parameter back, so the model is bit for bit
what it was. Weights packed for oneDNN (``PackedConv2d``, ``PackedLinear``) and weights upcast on use are handled alike.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from latentgen.errors import CheckpointError

_ROLE = re.compile(
    r"^(?P<path>.+?)\.(?P<role>lora_down\.weight|lora_up\.weight|lora_mid\.weight|alpha|hada_w[12]_[ab]|hada_t[12]"
    r"|lokr_w[12](?:_[ab])?|lokr_t2|diff|diff_b|dora_scale|lora_[AB](?:\.default)?\.weight"
    r"|lora(?:_linear_layer)?\.(?:down|up)\.weight)$"
)
_ROLE_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
}
# (key prefix, part of the model): "te" is the (first) CLIP text encoder, "te2" SDXL's bigG.
_PARTS = (
    ("lora_unet_", "unet"),
    ("lora_te1_", "te"),
    ("lora_te2_", "te2"),
    ("lora_te_", "te"),
    ("unet.", "unet"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
)
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


class AdapterWarning(UserWarning):
    """Something in an adapter file was not used (the CLI prints it as one warning line)."""


def _flat(name: str) -> str:
    return name.replace(".", "_")


def diffusers_unet_name(name: str, unet) -> str | None:
    """diffusers' UNet2DConditionModel path of one of our (openaimodel) UNet modules, or None."""
    nrb = unet.config.num_res_blocks
    parts = name.split(".")
    head, rest = parts[:2], parts[2:]
    if name.startswith("time_embed."):
        return {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}.get(name)
    if name.startswith("label_emb.0."):  # SDXL's sequential vector embedding (diffusers' text_time addition)
        return {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}.get(name)
    if name.startswith("out."):
        return {"out.0": "conv_norm_out", "out.2": "conv_out"}.get(name)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    if head[0] == "middle_block":
        base = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}[head[1]]
        kind = "attentions" if head[1] == "1" else "resnets"
        return _join(base, kind, rest)
    if head[0] not in ("input_blocks", "output_blocks") or not rest or not rest[0].isdigit():
        return None
    n, k, rest = int(head[1]), int(rest[0]), rest[1:]
    block = (unet.input_blocks if head[0] == "input_blocks" else unet.output_blocks)[n][k]
    kind = type(block).__name__
    if head[0] == "input_blocks":
        if n == 0:
            return ".".join(["conv_in", *rest])
        level, j = divmod(n - 1, nrb + 1)
        if kind == "Downsample":
            return ".".join([f"down_blocks.{level}.downsamplers.0.conv", *rest[1:]])
        side = f"down_blocks.{level}"
    else:
        level, j = divmod(n, nrb + 1)
        if kind == "Upsample":
            return ".".join([f"up_blocks.{level}.upsamplers.0", *rest])
        side = f"up_blocks.{level}"
    plural = "resnets" if kind == "ResBlock" else "attentions"
    return _join(f"{side}.{plural}.{j}", plural, rest)


def _join(base: str, kind: str, rest: list[str]) -> str:
    inner = ".".join(rest)
    if kind == "resnets":
        for ours, theirs in _RESNET.items():
            if inner == ours or inner.startswith(ours + "."):
                inner = theirs + inner[len(ours) :]
                break
    return f"{base}.{inner}" if inner else base


def layer_table(bundle) -> dict[str, dict[str, nn.Module]]:
    """Flat layer names (dots as underscores) → module, per part: the UNet under its original and diffusers names,
    each CLIP text encoder under transformers' names (with and without ``text_model_``): ``te`` the CLIP text encoder
    of SD 1.x / 2.x or SDXL's CLIP ViT-L (absent in the refiner), ``te2`` SDXL's bigG."""
    unet = {}
    for name, m in bundle.unet.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            unet[_flat(name)] = m
            dn = diffusers_unet_name(name, bundle.unet)
            if dn is not None:
                unet[_flat(dn)] = m
    table = {"unet": unet}
    cond = bundle.cond
    if hasattr(cond, "bigg"):  # SDXL: SDXLConditioner
        clip_l = cond.clip_l.text_model if cond.clip_l is not None else None
        encoders = {"te": clip_l, "te2": cond.bigg.tower.text_model}
    else:
        encoders = {"te": getattr(cond, "text_model", None)}
    for part, text_model in encoders.items():
        te = table[part] = {}
        if text_model is None:
            continue
        for name, m in text_model.named_modules():
            if isinstance(m, nn.Linear):
                te[_flat("text_model." + name)] = m
                te[_flat(name)] = m
    return table


def _for_family(paths, bundle) -> str:
    """The end of an error line: the family the file's layer paths show (SDXL: a second text encoder, ``lora_te1_``
    or SDXL's vector embedding; SD 1.x/2.x: one text encoder) when it is not the model's."""
    paths = list(paths)
    family = None
    if any(p.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for p in paths):
        family = "SDXL"
    elif any("label_emb_0_" in _flat(p) or "add_embedding" in p for p in paths):
        family = "SDXL"
    elif any(p.startswith(("lora_te_", "text_encoder.")) for p in paths):
        family = "SD 1.x/2.x"
    ours = {"sdxl": "SDXL", "sd1": "SD 1.x/2.x", "sd2": "SD 1.x/2.x"}.get(bundle.config.family)
    if family and family != ours:
        return f"it was made for {family}, not {bundle.config.name}"
    return f"it was made for another model family than {bundle.config.name}"


# ------------------------------------------------------------------------------------------------ deltas


def group_keys(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """{layer path: {role: tensor}} of an adapter file, and the keys that are no adapter weight."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    other = []
    for key, value in sd.items():
        m = _ROLE.match(key)
        if m is None:
            other.append(key)
            continue
        role = _ROLE_ALIASES.get(m.group("role"), m.group("role"))
        groups.setdefault(m.group("path"), {})[role] = value
    return groups, other


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild of a conv factor (LyCORIS layout): t [r1, r2, kh, kw], wa [r1, out], wb [r2, in] →
    [out, in, kh, kw]."""
    return torch.einsum("ijkl,ip,jr->prkl", t, wa.flatten(1), wb.flatten(1))


def compute_delta(roles: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """ΔW of one layer (float32, in ``shape``), the scale included."""
    w = {k: v.float() for k, v in roles.items()}
    alpha = float(w["alpha"]) if "alpha" in w else None
    if "diff" in w:
        delta, rank = w["diff"], None
    elif "lora_up.weight" in w:
        up, down = w["lora_up.weight"], w["lora_down.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in w:
            delta = _tucker(w["lora_mid.weight"], up.flatten(1).T, down)
        else:
            delta = up.flatten(1) @ down.flatten(1)
            if down.ndim == 4:
                delta = delta.reshape(up.shape[0], *down.shape[1:])
    elif "hada_w1_a" in w:
        rank = w["hada_w1_b"].shape[0]
        factors = []
        for i in ("1", "2"):
            a, b = w[f"hada_w{i}_a"], w[f"hada_w{i}_b"]
            factors.append(_tucker(w[f"hada_t{i}"], a, b) if f"hada_t{i}" in w else a @ b)
        delta = factors[0] * factors[1]
    elif any(k.startswith("lokr_") for k in w):
        rank = w["lokr_w1_b"].shape[0] if "lokr_w1_b" in w else w["lokr_w2_b"].shape[0] if "lokr_w2_b" in w else None
        w1 = w["lokr_w1"] if "lokr_w1" in w else w["lokr_w1_a"] @ w["lokr_w1_b"]
        if "lokr_w2" in w:
            w2 = w["lokr_w2"]
        elif "lokr_t2" in w:
            w2 = _tucker(w["lokr_t2"], w["lokr_w2_a"], w["lokr_w2_b"])
        else:
            w2 = w["lokr_w2_a"] @ w["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    else:
        raise CheckpointError(f"adapter roles {sorted(roles)} are incomplete (no up/down, hada, lokr or diff pair)")
    if delta.numel() != shape.numel():
        raise ValueError(f"{list(delta.shape)} (model wants {list(shape)})")
    scale = alpha / rank if alpha is not None and rank else 1.0
    return delta.reshape(shape) * scale


@dataclass
class Delta:
    """One layer's change: module, parameter name ("weight" or "bias"), part ("unet", "te" or SDXL's "te2") and ΔW
    at multiplier 1, given or rebuilt from the file's factors (``roles``) each time it is merged: a dense ΔW per
    layer would hold as much memory as the layers themselves."""

    module: nn.Module
    param: str
    delta: torch.Tensor | None
    part: str
    roles: Mapping[str, torch.Tensor] | None = None

    def value(self) -> torch.Tensor:
        if self.delta is not None:
            return self.delta
        return compute_delta(self.roles, getattr(self.module, self.param).shape)


def _part(path: str) -> tuple[str | None, str]:
    for prefix, part in _PARTS:
        if path.startswith(prefix):
            return part, path[len(prefix) :]
    return None, path


def lora_deltas(bundle, sd: Mapping[str, torch.Tensor], source: str) -> list[Delta]:
    """The deltas an adapter file makes on ``bundle``. Keys that match no layer: one AdapterWarning with the count
    and an example; a delta of the wrong shape, an SDXL second-encoder LoRA, or a file of which nothing matches:
    CheckpointError."""
    groups, other = group_keys(sd)
    if not groups:
        raise CheckpointError(f"{source}: no LoRA/LyCORIS weights (keys like {sorted(sd)[:1]}); is it an adapter?")
    table = layer_table(bundle)
    out, unmatched = [], []
    for path, roles in groups.items():
        part, rest = _part(path)
        if part == "te2" and "te2" not in table:
            raise CheckpointError(
                f"{source}: {path} is for SDXL's second text encoder; this LoRA is for SDXL, not {bundle.config.name}"
            )
        module = table.get(part or "", {}).get(_flat(rest))
        if module is None:
            unmatched.append(path)
            continue
        if "dora_scale" in roles:
            raise CheckpointError(f"{source}: {path} is a DoRA layer (dora_scale), which latentgen does not apply")
        for param, keys in (("weight", roles.keys() - {"diff_b"}), ("bias", {"diff_b"} & roles.keys())):
            if not keys:
                continue
            target = getattr(module, param)
            if target is None:
                raise CheckpointError(f"{source}: {path} has a bias difference but the layer has no bias")
            chosen = {"diff": roles["diff_b"]} if param == "bias" else {k: roles[k] for k in keys}
            try:
                compute_delta(chosen, target.shape)  # checked now, rebuilt when merged
            except ValueError as e:
                raise CheckpointError(f"{source}: {path} has shape {e} — {_for_family(groups, bundle)}") from None
            out.append(Delta(module, param, None, part, chosen))
    if not out:
        raise CheckpointError(
            f"{source}: none of its {len(groups)} layers (e.g. {sorted(groups)[0]}) exists in {bundle.config.name}; "
            f"{_for_family(groups, bundle)}"
        )
    if unmatched:
        warnings.warn(
            f"{source}: {len(unmatched)} of {len(groups)} LoRA layers match no layer of {bundle.config.name} and "
            f"are ignored (e.g. {sorted(unmatched)[0]})",
            AdapterWarning,
            stacklevel=2,
        )
    return out


# ------------------------------------------------------------------------------------- merge and restore


def _holder(module: nn.Module, param: str) -> tuple[nn.Module, str]:
    """Where the stored tensor of ``module.param`` lives (a parametrization keeps it as ``original``)."""
    from torch.nn.utils import parametrize

    if parametrize.is_parametrized(module, param):
        return module.parametrizations[param], "original"
    return module, param


@dataclass
class Merged:
    """Weights of a model with adapters merged in; :meth:`set` changes the set, :meth:`restore` undoes all."""

    saved: dict = field(default_factory=dict)  # (id(module), param) → (module, param, stored Parameter or packed)
    current: tuple = ()

    def restore(self) -> None:
        for module, param, kept in self.saved.values():
            holder, name = _holder(module, param)
            if isinstance(kept, nn.Parameter):
                holder._parameters[name] = kept
            else:  # a packed layer's packed weight: drop the dense merged weight, keep the packed one
                holder._parameters.pop(name, None)
                module.packed = kept
        self.saved.clear()
        self.current = ()

    def set(self, deltas: Sequence[tuple[Delta, float]], key: tuple = ()) -> None:
        """Weights = base + Σ multiplier·ΔW for exactly these (delta, multiplier) pairs; ``key`` names the set, and
        setting the same key again changes nothing."""
        if key and key == self.current:
            return
        self.restore()
        total: dict = {}
        for d, mult in deltas:
            if mult == 0:
                continue
            slot = total.setdefault((id(d.module), d.param), [d.module, d.param, 0])
            slot[2] = slot[2] + d.value() * mult
        with torch.no_grad():
            for ident, (module, param, delta) in total.items():
                holder, name = _holder(module, param)
                if name in holder._parameters:
                    base = holder._parameters[name]
                    self.saved[ident] = (module, param, base)
                else:  # a packed layer after its first call
                    base = module.weight
                    self.saved[ident] = (module, param, module.packed)
                    del module.packed
                merged = (base.float() + delta.to(base.device)).to(base.dtype)
                holder._parameters[name] = nn.Parameter(merged, requires_grad=False)
        self.current = key


def read_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an adapter file (safetensors only: pickles are refused with the conversion command)."""
    from latentgen.loading.safetensors import read_safetensors

    return read_safetensors(path)[0]
