"""Prompts and adapters on the command line: --lora, --lora-dir, --embedding, --clip-skip, --emphasis, the
``<lora:NAME:...>`` tags in prompts and the ``"loras"`` of JSON-lines items.

Every item's weights are the base model's plus that item's LoRAs (adapters.lora.Merged): the base stays loaded and
an item without LoRAs gets the base weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import CheckpointError, ConfigError, InputError
from .options import keyword_params

LoraOpt = typer.Option(
    None, "--lora", help="LoRA / LyCORIS safetensors, FILE[:WEIGHT] (repeatable); prompts may also say <lora:NAME:W>."
)
LoraDirOpt = typer.Option(None, "--lora-dir", help="Folder searched for <lora:NAME> tags (repeatable).")
EmbeddingOpt = typer.Option(
    None,
    "--embedding",
    help="Textual-inversion embedding FILE or folder (repeatable); the prompt names it by stem. SDXL: files with "
    "clip_l and clip_g vectors.",
)
ClipSkipOpt = typer.Option(
    None,
    "--clip-skip",
    help="A1111's clip skip N: CLIP hidden state N-1 layers from the end (SD 1.x; SD 2.x and SDXL keep the "
    "penultimate layer, as A1111; it is recorded).",
)
VaeOpt = typer.Option(
    None,
    "--vae",
    help="VAE safetensors or diffusers vae/ folder in place of the model's (default: <ckpt>.vae.safetensors).",
)
EmphasisOpt = typer.Option(
    None, "--emphasis", help="Prompt weights: original (default), no-norm, none (syntax stripped) or literal."
)

ADAPTER_OPTIONS = keyword_params(
    lora=(Optional[list[str]], LoraOpt),
    lora_dir=(Optional[list[str]], LoraDirOpt),
    embedding=(Optional[list[str]], EmbeddingOpt),
    clip_skip=(Optional[int], ClipSkipOpt),
    emphasis=(Optional[str], EmphasisOpt),
    vae=(Optional[str], VaeOpt),
)
"""The options txt2img, img2img and inpaint end with; each takes them as ``**adapters`` for `PromptAdapters`."""


def parse_lora_option(spec: str) -> tuple[str, float]:
    """FILE[:WEIGHT] → (FILE, WEIGHT); the weight defaults to 1."""
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


class PromptAdapters:
    """The adapters and prompt options of one generation command."""

    def __init__(
        self, sess, lora=None, lora_dir=None, embedding=None, clip_skip=None, emphasis=None, vae=None, recipe=None
    ):
        from ..adapters.embeddings import load_embeddings, load_sdxl_embeddings
        from ..adapters.lora import Merged
        from ..config import load_registry
        from ..text.prompts import check_options

        rec = recipe or {}
        self.sess, self.bundle = sess, sess.bundle
        self.clip_skip = int(clip_skip if clip_skip is not None else rec.get("clip_skip", 1))
        self.emphasis = emphasis if emphasis is not None else rec.get("emphasis", "original")
        check_options(self.clip_skip, self.emphasis)
        reg = load_registry()
        self.dirs = [Path(d) for d in [*(lora_dir or []), *reg.get("lora_dirs", [])]]
        self.cache: dict[Path, tuple[list, str]] = {}
        self.merged = Merged()
        self.fixed = []
        for spec in lora or []:
            path, weight = parse_lora_option(spec)
            self.fixed.append((self._deltas_for(Path(path), f"--lora {spec}"), weight, weight))
        self.a1111_hashes = dict(rec.get("lora_hashes") or {})
        self.from_recipe = bool(rec.get("loras")) and not lora
        if self.from_recipe:  # the recorded files, by path and checked by sha256; the prompt's tags are not re-read
            for e in rec["loras"]:
                path = self._deltas_for(recorded(e, "LoRA"), "--recipe LoRA")
                self.fixed.append((path, float(e["te"]), float(e["unet"])))
        if not embedding and rec.get("embeddings"):
            embedding = [str(recorded(e, "embedding")) for e in rec["embeddings"]]
        if not vae and rec.get("vae"):
            vae = str(recorded(rec["vae"], "VAE"))
        self.vectors = {}
        kind = self.bundle.config.cond.kind
        if embedding:
            cond = self.bundle.cond
            if kind == "sdxl":  # vectors per encoder: clip_l for CLIP-L (absent in the refiner), clip_g for bigG
                widths = {"clip_l": cond.cfg.clip_l, "clip_g": cond.cfg.bigg}
                widths = {k: c.hidden_size for k, c in widths.items() if c is not None}
                self.vectors = load_sdxl_embeddings(embedding, widths)
            elif kind in ("clip", "open_clip"):
                self.vectors = load_embeddings(embedding, cond.cfg.hidden_size)
            else:
                raise ConfigError(f"--embedding needs a CLIP text encoder; {self.bundle.config.name} has none")
        self.vae = self._override_vae(vae)
        from .app import note

        if self.clip_skip > 1 and kind in ("open_clip", "sdxl"):
            family = "SD 2.x" if kind == "open_clip" else "SDXL"
            note(f"--clip-skip: {family} already uses the penultimate layer; as A1111, it is not changed", sess.quiet)
        if kind == "bert" and self.clip_skip > 1:
            note(f"--clip-skip: {self.bundle.config.name} has a BERT text encoder, not CLIP; not used", sess.quiet)
        elif kind not in ("clip", "open_clip", "sdxl", "bert") and (self.clip_skip > 1 or self.emphasis != "original"):
            note(
                f"--clip-skip / --emphasis: {self.bundle.config.name} has no text encoder; prompts are read as written",
                sess.quiet,
            )

    def _override_vae(self, vae) -> dict | None:
        from ..adapters.vae import beside, override_vae
        from ..images import file_sha256
        from .app import note

        path = Path(vae) if vae else beside(self.bundle.path)
        if path is None:
            return None
        if not path.exists():
            raise CheckpointError(f"--vae {path}: no such file or folder")
        if not vae:
            note(f"using the VAE beside the checkpoint: {path} (as A1111; --vae FILE picks another)", self.sess.quiet)
        override_vae(self.bundle, path)
        name = path.name.removesuffix(".safetensors") if path.is_file() else path.name
        return {"name": name, "path": str(path.resolve()), "sha256": file_sha256(path)}

    # ------------------------------------------------------------------------------------------- LoRA files

    def _deltas_for(self, path: Path, what: str):
        from ..adapters.lora import lora_deltas, read_adapter
        from ..images import file_sha256

        path = path.resolve() if path.exists() else path
        if path not in self.cache:
            if not path.exists():
                raise CheckpointError(f"{what}: no such file {path}")
            self.cache[path] = (lora_deltas(self.bundle, read_adapter(path), str(path)), file_sha256(path))
        return path

    def resolve(self, name: str) -> Path:
        """A LoRA NAME of a tag or an item: a path, or NAME(.safetensors) in the LoRA folders (searched down)."""
        p = Path(name)
        if p.suffix and p.exists():
            return p
        for d in self.dirs:
            for cand in (d / f"{name}.safetensors", d / name):
                if cand.is_file():
                    return cand
            found = sorted(d.rglob(f"{name}.safetensors"))
            if found:
                return found[0]
            pickled = [d / f"{name}{s}" for s in (".pt", ".ckpt", ".bin")]
            if any(c.exists() for c in pickled):
                return next(c for c in pickled if c.exists())  # read_adapter refuses it with the conversion command
        where = ", ".join(map(str, self.dirs)) or "no folder (pass --lora-dir DIR or set lora_dirs in models.toml)"
        raise InputError(f"LoRA {name!r} not found in {where}")

    def _check_a1111_hash(self, name: str, path: Path) -> None:
        """An A1111 image names its LoRAs' short hashes: say so (once) when the file found is another one."""
        want = self.a1111_hashes.pop(name, None)
        if want and not self.cache[path][1].startswith(want.lower()):
            from .app import note

            note(f"LoRA {name}: {path} is not the file the image was made with (hash {want})", self.sess.quiet)

    # ----------------------------------------------------------------------------------------- per item

    def apply(self, item: dict, settings, text: str, negative: str) -> tuple[str, str, dict]:
        """Merge the item's LoRAs (--lora, prompt tags, "loras"), set the prompt options on ``settings``; returns
        the prompt and negative without tags and the recipe fields to record."""
        from ..text.prompts import extract_lora_tags

        text, tags = extract_lora_tags(text)
        negative, _ = extract_lora_tags(negative)  # tags in the negative prompt are removed, not applied
        chosen = list(self.fixed)
        for tag in [] if self.from_recipe else tags:
            path = self._deltas_for(self.resolve(tag.name), f"<lora:{tag.name}>")
            self._check_a1111_hash(tag.name, path)
            chosen.append((path, tag.te, tag.unet))
        loras = item.get("loras") or {}
        if not isinstance(loras, dict):
            raise InputError('"loras" must be an object {"NAME": WEIGHT}')
        for name, w in loras.items():
            te, unet = (w.get("te", 1.0), w.get("unet", w.get("te", 1.0))) if isinstance(w, dict) else (w, w)
            chosen.append((self._deltas_for(self.resolve(name), f'"loras": {name}'), float(te), float(unet)))
        pairs = [(d, unet if d.part == "unet" else te) for path, te, unet in chosen for d in self.cache[path][0]]
        self.merged.set(pairs, key=tuple((str(p), te, unet) for p, te, unet in chosen) or ("base",))
        settings.clip_skip, settings.emphasis = self.clip_skip, self.emphasis
        used = {k: v for k, v in self.vectors.items() if k in text or k in negative}
        settings.embeddings = {k: v for k, (v, _) in used.items()}
        meta: dict = {}
        if chosen:
            meta["loras"] = [
                {"name": Path(p).stem, "path": str(p), "sha256": self.cache[p][1], "te": te, "unet": unet}
                for p, te, unet in chosen
            ]
        if used:
            from ..images import file_sha256

            meta["embeddings"] = [{"name": k, "path": str(f), "sha256": file_sha256(f)} for k, (_, f) in used.items()]
        if self.vae:
            meta["vae"] = self.vae
        if self.clip_skip != 1:
            meta["clip_skip"] = self.clip_skip
        if self.emphasis != "original":
            meta["emphasis"] = self.emphasis
        return text, negative, meta


def recorded(entry: dict, what: str) -> Path:
    """A file a recipe records by path and sha256: refused (one line) when it is missing or has changed."""
    from ..images import file_sha256

    p = Path(entry["path"])
    if not p.exists():
        raise InputError(f"--recipe: the {what} {p} it records is missing; put it back or pass the option anew")
    if file_sha256(p) != entry["sha256"]:
        raise InputError(f"--recipe: the {what} {p} has changed since the image was made (sha256 differs)")
    return p
