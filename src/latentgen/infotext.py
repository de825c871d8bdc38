"""PNG text: A1111's `parameters` infotext (read by other tools) and the complete latentgen recipe.

Sampler and schedule names map both ways with A1111's display names (samplers.SAMPLER_NAMES,
schedulers.SCHEDULER_LABELS): "DPM++ 2M Karras" (the name A1111 wrote before 1.9) or "DPM++ 2M" with
"Schedule type: Karras" (1.9 and later) both read as dpmpp_2m on the karras schedule.
"""

from __future__ import annotations

import json
import re

from .errors import ConfigError

# Hires-fix upscalers (hires.py) → A1111's "Hires upscaler" labels.
HIRES_UPSCALERS = {
    "latent": "Latent",
    "latent-bicubic": "Latent (bicubic)",
    "latent-antialiased": "Latent (antialiased)",
    "lanczos": "Lanczos",
}
# Schedule suffixes A1111 put in sampler names before it had a "Schedule type" field.
LEGACY_SUFFIXES = {" karras": "karras", " exponential": "exponential"}
AUTOMATIC = ("automatic", "")  # A1111: the sampler's own default


def a1111_sampler_label(sampler: str) -> str:
    """A1111's display name of `sampler` (our own name where A1111 has none)."""
    from .samplers import SAMPLER_NAMES  # the name tables live next to the code; torch loads only when needed

    return (SAMPLER_NAMES.get(sampler, (None, None))[0]) or sampler


def _lookup_sampler(label: str) -> str | None:
    from .samplers import SAMPLER_NAMES

    key = label.strip().lower()
    for name, (a1111, comfy) in SAMPLER_NAMES.items():
        if key in (name, (a1111 or "").lower(), (comfy or "").lower()):
            return name
    return None


def _lookup_schedule(label: str) -> str | None:
    from .schedulers import SCHEDULER_LABELS

    key = label.strip().lower()
    if key in AUTOMATIC:
        return None
    if key == "uniform":  # A1111's k-diffusion default spacing: the model's own timesteps
        return "normal"
    for name, shown in SCHEDULER_LABELS.items():
        if key in (name, shown.lower()):
            return name
    raise ConfigError(f"unknown schedule type '{label}'; choose one of {', '.join(SCHEDULER_LABELS.values())}")


def sampler_from_a1111(label: str, schedule_type: str | None = None) -> tuple[str, str | None]:
    """(sampler, scheduler or None for the sampler's default) from an A1111 / ComfyUI / latentgen sampler name
    and an optional A1111 "Schedule type" value."""
    name = _lookup_sampler(label)
    schedule = None
    if name is None:
        for suffix, sched in LEGACY_SUFFIXES.items():
            if label.strip().lower().endswith(suffix):
                name, schedule = _lookup_sampler(label.strip()[: -len(suffix)]), sched
                break
    if name is None:
        from .samplers import SAMPLER_NAMES

        choices = ", ".join(SAMPLER_NAMES)
        raise ConfigError(f"unknown sampler '{label}'; choose one of {choices} (or their A1111 names, e.g. 'Euler a')")
    if schedule_type is not None:
        schedule = _lookup_schedule(schedule_type)
    return name, schedule


def _schedule_of(meta: dict) -> str | None:
    if meta.get("scheduler"):
        return meta["scheduler"]
    return "karras" if meta.get("karras") else None  # recipes written before --scheduler


def png_text(meta: dict) -> dict[str, str]:
    """A1111's `parameters` chunk (read by other tools) and the complete latentgen recipe.

    Karras runs keep A1111's classic "<sampler> Karras" name; any other schedule is written as A1111's
    "Schedule type" field, so the text always says which schedule was used.
    """
    from .schedulers import SCHEDULER_LABELS

    sampler = a1111_sampler_label(meta["sampler"])
    schedule = _schedule_of(meta)
    lines = [meta.get("prompt", "")]
    if meta.get("negative"):
        lines.append(f"Negative prompt: {meta['negative']}")
    fields = [f"Steps: {meta['steps']}", f"Sampler: {sampler}" + (" Karras" if schedule == "karras" else "")]
    if schedule not in (None, "karras"):
        fields.append(f"Schedule type: {SCHEDULER_LABELS.get(schedule, schedule)}")
    fields += [
        f"CFG scale: {meta['cfg']}",
        f"Seed: {meta['seed']}",
        f"Size: {meta['width']}x{meta['height']}",
        f"Model hash: {meta.get('model_hash', '')}",
        f"Model: {meta.get('model', '')}",
    ]
    if meta.get("strength") is not None and meta["task"] != "txt2img":
        fields.append(f"Denoising strength: {meta['strength']}")
    if meta.get("subseed") is not None and meta.get("subseed_strength"):
        fields += [f"Variation seed: {meta['subseed']}", f"Variation seed strength: {meta['subseed_strength']}"]
    if meta.get("ensd"):
        fields.append(f"ENSD: {meta['ensd']}")
    if meta.get("rng") in ("nv", "cuda"):  # A1111 reads no RNG field as its default, the GPU
        fields.append(f"RNG: {'NV' if meta['rng'] == 'nv' else 'GPU'}")
    if meta.get("hires"):
        fields += _hires_fields(meta["hires"])
    fields += adapter_fields(meta)
    lines.append(", ".join(fields))
    return {"parameters": "\n".join(lines), "latentgen": json.dumps(meta)}


def _quote(text: str) -> str:
    """A1111's quoting of a field value that holds a separator."""
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def _hires_fields(h: dict) -> list[str]:
    """A1111's hires-fix keys (its "Size" stays the first pass's)."""
    fields = [f"Denoising strength: {h['strength']}", f"Hires upscale: {h['scale']:g}"]
    if h.get("steps"):
        fields.append(f"Hires steps: {h['steps']}")
    fields.append(f"Hires upscaler: {HIRES_UPSCALERS.get(h['upscaler'], h['upscaler'])}")
    if h.get("sampler"):
        fields.append(f"Hires sampler: {a1111_sampler_label(h['sampler'])}")
    if h.get("prompt"):
        fields.append(f"Hires prompt: {_quote(h['prompt'])}")
    return fields


EMPHASIS_NAMES = {"original": "Original", "no-norm": "No norm", "none": "Ignore", "literal": "None"}  # A1111's


def adapter_fields(meta: dict) -> list[str]:
    """A1111's keys for clip skip, emphasis (only when not the default), LoRAs and embeddings (12-hex short
    sha256, as A1111's "Lora hashes" / "TI hashes") and the VAE (10-hex, as "VAE hash")."""
    out = []
    if meta.get("clip_skip", 1) > 1:
        out.append(f"Clip skip: {meta['clip_skip']}")
    if meta.get("emphasis", "original") != "original":
        out.append(f"Emphasis: {EMPHASIS_NAMES.get(meta['emphasis'], meta['emphasis'])}")
    if meta.get("vae"):
        out += [f"VAE hash: {meta['vae']['sha256'][:10]}", f"VAE: {meta['vae']['name']}"]
    for key, label in (("loras", "Lora hashes"), ("embeddings", "TI hashes")):
        if meta.get(key):
            joined = ", ".join(f"{e['name']}: {e['sha256'][:12]}" for e in meta[key])
            out.append(f'{label}: "{joined}"')
    return out


# ------------------------------------------------------------------------------------ reading A1111's text

_FIELD = re.compile(r'\s*([\w][\w \-/+()]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_RNG_NAMES = {"nv": "nv", "gpu": "nv", "cpu": "cpu"}  # A1111's GPU noise: NV gives it on any device


def _fields(line: str) -> dict[str, str]:
    """The "Key: value" fields of A1111's last line; quoted values (JSON strings) unquoted."""
    found = {}
    for key, value in _FIELD.findall(line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = json.loads(value)
        found[key.strip()] = value
    return found


# Keys read for what they name elsewhere (the files come from the command line; "Schedule type" with "Sampler");
# any key parse_parameters neither reads nor lists here is reported as not honoured.
_IGNORED = {"Model hash", "Model", "TI hashes", "Version", "Schedule type", "Hires upscaler", "Hires steps"}
_IGNORED |= {"Hires sampler", "Hires prompt", "Denoising strength"}  # read with "Hires upscale"


def parse_parameters(text: str) -> tuple[dict, list[str]]:
    """A1111's ``parameters`` text → (a latentgen recipe: prompt, negative, steps, sampler, karras, cfg, seed,
    width, height, clip_skip, emphasis, ...; what could not be honoured). LoRA tags stay in the prompt. A1111's
    default noise source, the GPU, becomes `nv`, which gives the same noise on any device."""
    lines = text.strip().split("\n")
    fields: dict[str, str] = {}
    if lines and len(_FIELD.findall(lines[-1])) >= 3:
        fields = _fields(lines.pop())
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    rec: dict = {"prompt": "\n".join(prompt).strip(), "negative": "\n".join(negative).strip(), "rng": "nv"}
    skipped = []
    for key, value in fields.items():
        try:
            if key == "Steps":
                rec["steps"] = int(value)
            elif key == "CFG scale":
                rec["cfg"] = float(value)
            elif key == "Seed":
                rec["seed"] = int(value)
            elif key == "Size":
                rec["width"], rec["height"] = (int(v) for v in value.lower().split("x"))
            elif key == "Clip skip":
                rec["clip_skip"] = int(value)
            elif key == "Emphasis":
                names = {v.lower(): k for k, v in EMPHASIS_NAMES.items()}
                rec["emphasis"] = names[value.lower()]
            elif key == "Sampler":
                rec["sampler"], schedule = sampler_from_a1111(value, fields.get("Schedule type"))
                if schedule is not None:
                    rec["scheduler"] = schedule
            elif key == "Variation seed":
                rec["subseed"] = int(value)
            elif key == "Variation seed strength":
                rec["subseed_strength"] = float(value)
            elif key == "ENSD":
                rec["ensd"] = int(value)
            elif key == "RNG":
                rec["rng"] = _RNG_NAMES[value.lower()]
            elif key == "Hires upscale":
                hires = dict(scale=float(value), strength=float(fields.get("Denoising strength", 0.7)))
                upscalers = {v.lower(): k for k, v in HIRES_UPSCALERS.items()}
                hires["upscaler"] = upscalers[fields.get("Hires upscaler", "Latent").lower()]
                steps, sampler = fields.get("Hires steps"), fields.get("Hires sampler")
                hires["steps"] = int(steps) if steps else None
                hires["sampler"] = sampler_from_a1111(sampler)[0] if sampler else None
                hires["prompt"] = fields.get("Hires prompt") or None
                rec["hires"] = hires
            elif key == "Lora hashes":  # "name: hash, ...": the LoRAs found by name are checked against them
                pairs = (p.split(":", 1) for p in value.split(","))
                rec["lora_hashes"] = {n.strip(): h.strip() for n, h in pairs}
            elif key not in _IGNORED:
                skipped.append(f"{key}: {value}")
        except (KeyError, ValueError, ConfigError):
            skipped.append(f"{key}: {value}")
    return rec, skipped
