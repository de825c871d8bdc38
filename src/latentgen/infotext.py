"""PNG text: A1111's `parameters` infotext (read by other tools) and the complete latentgen recipe."""

from __future__ import annotations

import json

SAMPLER_LABELS = {
    "ddim": "DDIM",
    "plms": "PLMS",
    "euler": "Euler",
    "euler_a": "Euler a",
    "heun": "Heun",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "ddpm": "DDPM",
}


def png_text(meta: dict) -> dict[str, str]:
    """A1111's `parameters` chunk (read by other tools) and the complete latentgen recipe."""
    sampler = SAMPLER_LABELS.get(meta["sampler"], meta["sampler"]) + (" Karras" if meta.get("karras") else "")
    lines = [meta.get("prompt", "")]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    fields = [
        f"Steps: {meta['steps']}",
        f"Sampler: {sampler}",
        f"CFG scale: {meta['cfg']}",
        f"Seed: {meta['seed']}",
        f"Size: {meta['width']}x{meta['height']}",
        f"Model hash: {meta.get('model_hash', '')}",
        f"Model: {meta.get('model', '')}",
    ]
    if meta.get("strength") is not None and meta["task"] != "txt2img":
        fields.append(f"Denoising strength: {meta['strength']}")
    lines.append(", ".join(fields))
    return {"parameters": "\n".join(lines), "latentgen": json.dumps(meta)}
