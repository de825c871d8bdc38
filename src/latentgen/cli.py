"""The `latentgen` command line. Argument parsing, the stdin/stdout protocol, progress on stderr,
errors as one line + exit code. No maths here; torch is imported only inside commands so that
`latentgen --help` starts fast."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import CheckpointError, ConfigError, InputError, LatentgenError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: rich's help rendering costs more than the 0.3 s start-up budget
    help="Latent diffusion from the shell: generate, encode, decode, inspect and train LDM / Stable Diffusion models.",
)

EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> None:
    """Print one line on stderr and exit."""
    print(f"latentgen: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def note(message: str, quiet: bool = False) -> None:
    if not quiet:
        print(f"latentgen: {message}", file=sys.stderr)


def guarded(fn):
    """Run a command with the CLI's error protocol: a LatentgenError becomes one line on stderr and exit 2;
    a closed stdout (`| head`) exits 1 quietly; Ctrl-C exits 130. Typer reads the wrapped signature."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        import warnings

        warnings.showwarning = _warning_as_note
        try:
            return fn(*args, **kwargs)
        except LatentgenError as e:
            fail(str(e))
        except BrokenPipeError:
            sys.stderr.close()
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            print("latentgen: interrupted", file=sys.stderr)
            raise SystemExit(130) from None

    return run


def _warning_as_note(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"latentgen: warning: {str(message).splitlines()[0] if str(message) else category.__name__}", file=sys.stderr)


def command(name: str | None = None):
    """`@command()` with the error protocol of `guarded`."""

    def register(fn):
        app.command(name)(guarded(fn))
        return fn

    return register


PredictionOpt = typer.Option(None, "--prediction", help="Override what the model predicts: eps or v.")
ConfigOpt = typer.Option(None, "--config", help="Original LDM/SD config (.yaml or .json) for this checkpoint.")


@command()
def info(
    model: str = typer.Argument(..., help="Checkpoint file, diffusers folder or models.toml name."),
    prediction: Optional[str] = PredictionOpt,
    config: Optional[str] = ConfigOpt,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Show what a checkpoint is: family, parameter counts, prediction, latent channels, f, conditioning."""
    from .checkpoint import describe, load_model

    bundle = load_model(model, prediction=prediction, config=config)
    d = describe(bundle)
    if as_json:
        print(json.dumps(d))
        return
    p = d["params"]
    guess = " (guess)" if d["prediction_source"] == "guess" else ""
    lines = [
        f"model         {d['name']}  ({d['format']} format)",
        f"path          {d['path']}",
        f"family        {d['family']}",
        f"prediction    {d['prediction']}{guess}",
        f"first stage   {d['first_stage'].upper()}, f={d['factor']}, {d['latent_channels']} latent channels, "
        f"scale {d['scale_factor']:g}",
        f"conditioning  {d['conditioning']} ({d['conditioning_key']}"
        + (f", concat {d['concat']}" if d["concat"] else "")
        + (f", context {d['context_dim']}" if d["context_dim"] else "")
        + (f", low-res noise levels 0..{d['max_noise_level']}" if d.get("max_noise_level") is not None else "")
        + ")",
        f"parameters    UNet {p['unet'] / 1e6:.2f}M, first stage {p['first_stage'] / 1e6:.2f}M, "
        f"conditioning {p['cond'] / 1e6:.2f}M",
    ]
    print("\n".join(lines))
    for n in d["notes"]:
        note(n)


@command()
def models(as_json: bool = typer.Option(False, "--json", help="One JSON object per model.")) -> None:
    """List the models.toml registry and whether each entry resolves to a file on disk."""
    from pathlib import Path

    from .checkpoint import builtin_dir
    from .config import BUILTIN_PREFIX, load_registry

    reg = load_registry()
    for name, entry in sorted(reg["models"].items()):
        path = str(entry.get("path", ""))
        target = (
            builtin_dir() / (path[len(BUILTIN_PREFIX) :] + ".safetensors")
            if path.startswith(BUILTIN_PREFIX)
            else Path(path)
        )
        rec = {
            "name": name,
            "path": path,
            "present": target.exists(),
            "default": name == reg["default"],
            "description": entry.get("description", ""),
        }
        if as_json:
            print(json.dumps(rec))
        else:
            mark = "*" if rec["default"] else " "
            state = "present" if rec["present"] else "missing"
            print(f"{mark} {name:<20} {state:<8} {path}  {rec['description']}")


# ------------------------------------------------------------------------------------------- generation

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
DEFAULTS = {"steps": 25, "sampler": "dpmpp_2m", "karras": True, "spacing": "leading", "cfg": 7.5, "eta": 0.0}
ITEM_KEYS = {
    "prompt",
    "negative",
    "seed",
    "out",
    "steps",
    "cfg",
    "sampler",
    "width",
    "height",
    "num",
    "strength",
    "class",
}

ModelOpt = typer.Option(
    None, "--model", "-m", help="Checkpoint file, diffusers folder or models.toml name (default: the registry default)."
)
NegativeOpt = typer.Option(None, "--negative", "-n", help="Negative prompt (classifier-free guidance).")
StepsOpt = typer.Option(None, "--steps", help="Sampling steps (default: the model's recommendation, else 25).")
SamplerOpt = typer.Option(None, "--sampler", help="ddim, plms, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_sde, ddpm.")
KarrasOpt = typer.Option(None, "--karras/--no-karras", help="Karras et al. (2022) σ schedule (default: on).")
SpacingOpt = typer.Option(None, "--spacing", help="Timestep spacing: leading (SD), trailing or linspace.")
CfgOpt = typer.Option(None, "--cfg", help="Classifier-free guidance scale; 1 disables the unconditional pass.")
EtaOpt = typer.Option(None, "--eta", help="DDIM η (0 = deterministic).")
SeedOpt = typer.Option(None, "--seed", help="Seed S; image i uses S+i. Random when omitted (always printed).")
NumOpt = typer.Option(1, "--num", help="Images per prompt.")
WidthOpt = typer.Option(None, "--width", help="Image width in pixels (multiple of the model's factor).")
HeightOpt = typer.Option(None, "--height", help="Image height in pixels.")
OutOpt = typer.Option(
    None,
    "--out",
    "-o",
    help="Output path or pattern: {index}, {seed}, {prompt}, {i}, {model} (e.g. out/{index:05d}-{seed}.png).",
)
DtypeOpt = typer.Option("auto", "--dtype", help="auto, fp32, bf16 or fp16.")
DeviceOpt = typer.Option("auto", "--device", help="auto, cpu, cuda or mps.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON record per image instead of its path.")
OverwriteOpt = typer.Option(False, "--overwrite", help="Replace existing output files.")
QuietOpt = typer.Option(False, "--quiet", "-q", help="No progress or notes on stderr.")
ClassOpt = typer.Option(None, "--class", help="Class label for class-conditional models.")
EmaOpt = typer.Option(False, "--ema", help="Use the checkpoint's EMA weights (model_ema.*).")
LowMemOpt = typer.Option(
    None,
    "--low-memory/--full-weights",
    show_default=False,
    help="CPU, fp32: keep an fp16/bf16 file's weights as stored and upcast each layer's as it "
    "runs (about half the memory, about 10% slower), or upcast them all at load. Default: full "
    "weights when they take under a third of the available memory.",
)


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu, cuda or mps, not '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    return device


def cpu_has_native_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def pick_dtype(dtype: str, device: str):
    import torch

    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.float16
        if device == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return torch.float32
    if dtype not in table:
        raise ConfigError(f"--dtype must be auto, fp32, bf16 or fp16, not '{dtype}'")
    return table[dtype]


class Session:
    """One generation command: the model (loaded once), defaults, the output protocol and the exit code."""

    def __init__(
        self,
        task: str,
        model,
        prediction,
        config,
        dtype,
        device,
        quiet,
        as_json,
        overwrite,
        out,
        ema=False,
        low_memory=None,
    ):
        import torch

        from .checkpoint import load_model, prepack_convs

        self.task, self.quiet, self.as_json, self.overwrite = task, quiet, as_json, overwrite
        self.rank, self.world = int_env("RANK", 0), int_env("WORLD_SIZE", 1)
        self.device = pick_device(device)
        if self.world > 1 and self.device == "cuda":
            self.device = f"cuda:{int_env('LOCAL_RANK', 0)}"
        self.dtype = pick_dtype(dtype, self.device)
        self.out = out or "out/{index:05d}-{seed}.png"
        check_out_pattern(self.out, overwrite)
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
        try:
            self.bundle = load_model(
                model,
                prediction=prediction,
                config=config,
                ema=ema,
                device=self.device,
                dtype=self.dtype,
                low_memory=low_memory,
            )
        except CheckpointError as e:
            if model is not None:
                raise
            raise CheckpointError(
                f"default model unavailable ({e}): pass --model NAME|PATH "
                "(python scripts/make_tiny_model.py tiny.safetensors makes a test model)"
            ) from e
        for n in self.bundle.notes:
            note(n, quiet)
        if self.device == "cpu" and self.dtype == torch.float32:  # generation only: never for training
            for m in (self.bundle.unet, self.bundle.first_stage):
                prepack_convs(m)
        bp = Path(self.bundle.path)
        self.model_path = str(bp.resolve()) if bp.exists() else self.bundle.path
        self.failed = 0
        self.records: list[dict] = []
        self.index = 0
        self._hash = None

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            from .images import file_hash

            self._hash = file_hash(self.bundle.path)
        return self._hash

    def settings(self, steps, sampler, karras, spacing, cfg, eta, strength=0.75, recipe=None):
        from .pipelines import Settings

        rec = {**DEFAULTS, **self.bundle.config.recommended, **(recipe or {})}
        given = {"steps": steps, "sampler": sampler, "karras": karras, "spacing": spacing, "cfg": cfg, "eta": eta}
        vals = {k: (v if v is not None else rec.get(k, DEFAULTS.get(k))) for k, v in given.items()}
        st = Settings(
            steps=int(vals["steps"]),
            sampler=str(vals["sampler"]),
            karras=bool(vals["karras"]),
            spacing=str(vals["spacing"]),
            cfg=float(vals["cfg"]),
            eta=float(vals["eta"] or 0.0),
            strength=float(strength),
        )
        st.check()
        return st

    def size(self, width, height, recipe=None):
        rec = {**self.bundle.config.recommended, **(recipe or {})}
        f = self.bundle.config.factor
        default = rec.get("width") or rec.get("height") or 8 * f * 8
        return int(width or rec.get("width") or default), int(height or rec.get("height") or default)

    def progress(self, total: int, label: str):
        return Progress(total, label, self.quiet)

    def path_for(self, pattern: str, *, index: int, seed: int, prompt: str, i: int) -> str:
        from .images import slugify

        try:
            return pattern.format(index=index, seed=seed, prompt=slugify(prompt), i=i, model=self.bundle.config.name)
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"--out pattern '{pattern}' is invalid ({e}); fields: index, seed, prompt, i, model"
            ) from e

    def read_items(self, prompt: Optional[str]) -> list[dict]:
        """The batch; under torchrun rank 0 reads stdin and sends the items to every rank."""
        if self.world == 1 or prompt != "-":
            return read_items(prompt, self.quiet)
        import torch.distributed as dist

        box = [read_items(prompt, self.quiet) if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def check_outputs(self, items: list[dict], num: int) -> None:
        """Usage errors found before any work: a fixed --out name for several images, or one that exists."""
        total = sum(int(it.get("num", num)) for it in items if "out" not in it and "_error" not in it)
        if total == 0 or has_fields(self.out):
            return
        if total > 1:
            raise ConfigError(
                f"--out {self.out} names one file but {total} images are made: add a field, "
                "e.g. --out 'out/{index:05d}-{seed}.png'"
            )
        if not self.overwrite and Path(self.out).exists():
            raise InputError(f"{self.out} exists: pass --overwrite to replace it")

    def emit(self, record: dict) -> None:
        if self.world > 1:
            self.records.append(record)
            return
        self._print(record)

    def _print(self, record: dict) -> None:
        if "error" in record:
            self.failed += 1
            print(f"latentgen: error: {record.get('item', '?')}: {record['error']}", file=sys.stderr)
        if self.as_json:
            print(json.dumps(record), flush=True)
        elif "error" not in record:
            print(record["path"], flush=True)

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, self.records)
            self.records = []
            if self.rank == 0:
                for rec in sorted((r for part in gathered for r in part), key=lambda r: r.get("index", 0)):
                    self._print(rec)
            else:
                self.failed = sum(1 for part in gathered for r in part if "error" in r)
            dist.destroy_process_group()
        raise SystemExit(1 if self.failed else 0)

    def mine(self, item_index: int) -> bool:
        return item_index % self.world == self.rank

    def save(self, image, path: str, meta: dict) -> None:
        from .images import save_png, to_pil

        save_png(to_pil(image), path, text=png_text(meta), overwrite=self.overwrite)


def has_fields(pattern: str) -> bool:
    return pattern.format(index=0, seed=0, prompt="p", i=0, model="m") != pattern if "{" in pattern else False


def check_out_pattern(pattern: str, overwrite: bool) -> None:
    """The output directory (the pattern's fixed part) must be creatable and writable before the model loads."""
    import os
    import tempfile

    try:
        probe = Path(pattern.format(index=0, seed=0, prompt="p", i=0, model="m"))
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"--out pattern '{pattern}' is invalid ({e}); fields: index, seed, prompt, i, model") from e
    parent = probe.parent if str(probe.parent) else Path(".")
    if "{" in str(Path(pattern).parent):  # the directory itself varies per image: check where it starts
        parent = next(iter(Path(pattern).parents))
        while "{" in str(parent):
            parent = parent.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".latentgen-probe.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise InputError(
            f"--out {pattern}: cannot write to directory {parent} ({e.strerror}); choose another --out"
        ) from e


def int_env(name: str, default: int) -> int:
    import os

    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


class Progress:
    """A rich progress bar on stderr (steps/s and ETA); silent with --quiet or when stderr is not a TTY
    unless LATENTGEN_PROGRESS=1."""

    def __init__(self, total: int, label: str, quiet: bool):
        import os

        self.bar = None
        if quiet or not (sys.stderr.isatty() or os.environ.get("LATENTGEN_PROGRESS") == "1"):
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
        from rich.progress import Progress as RP

        self.bar = RP(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            SpeedColumn(),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            transient=True,
        )
        self.task = self.bar.add_task(label, total=total)
        self.bar.start()

    def __call__(self, info: dict) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def SpeedColumn():
    """A rich column: steps per second (seconds per step when slower than one a second)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class _Speed(ProgressColumn):
        def render(self, task) -> Text:
            v = task.finished_speed or task.speed
            if not v:
                return Text("- step/s")
            return Text(f"{v:.2f} step/s" if v >= 1 else f"{1 / v:.2f} s/step")

    return _Speed()


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


def read_items(prompt: Optional[str], quiet: bool) -> list[dict]:
    """PROMPT, or `-`: one prompt per line on stdin, or JSON lines with per-item overrides."""
    if prompt != "-":
        return [{"prompt": prompt or ""}]
    items = []
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise ValueError("not an object")
                bad = set(obj) - ITEM_KEYS
                if bad:
                    raise ValueError(f"unknown keys {sorted(bad)}; allowed: {sorted(ITEM_KEYS)}")
                items.append({**obj, "_line": n})
            except ValueError as e:
                items.append({"_error": f"stdin line {n}: bad JSON line ({e})", "_line": n})
        else:
            items.append({"prompt": line, "_line": n})
    if not items:
        raise ConfigError("no prompts on stdin")
    return items


def base_seed(seed: Optional[int], quiet: bool) -> int:
    import secrets

    if seed is None:
        seed = secrets.randbelow(2**31)
        note(f"seed {seed}", quiet)
    return seed


def run_generation(sess: Session, items: list[dict], seed: int, num: int, make, task_meta: dict) -> None:
    """Drive the batch: per item, draw seeds, run `make(item, seeds, settings...)`, save, report."""
    import time

    counter = 0
    for k, item in enumerate(items):
        n = int(item.get("num", num))
        first = counter
        counter += n
        if not sess.mine(k):
            continue
        label = item.get("prompt", "")
        if "_error" in item:
            sess.emit({"index": first, "item": k, "error": item["_error"]})
            continue
        seeds = [int(item["seed"]) + i for i in range(n)] if "seed" in item else [seed + first + i for i in range(n)]
        t0 = time.perf_counter()
        try:
            images, meta = make(item, seeds)
        except LatentgenError as e:
            sess.emit({"index": first, "item": k, "prompt": label, "error": str(e)})
            continue
        dt = (time.perf_counter() - t0) / max(n, 1)
        for i, (img, s) in enumerate(zip(images, seeds)):
            rec = {
                "index": first + i,
                "item": k,
                **meta,
                "seed": s,
                "model": sess.bundle.config.name,
                "model_hash": sess.model_hash,
                "dtype": str(sess.dtype).replace("torch.", ""),
                "device": sess.device,
                **task_meta,
            }
            try:
                path = sess.path_for(item.get("out") or sess.out, index=first + i, seed=s, prompt=label, i=i)
                if n > 1 and "out" in item and "{" not in item["out"]:
                    raise ConfigError(f"item {k} makes {n} images but its out '{item['out']}' has no pattern field")
                sess.save(img, path, rec)
                sess.emit({**rec, "path": path, "seconds": round(dt, 3)})
            except LatentgenError as e:
                sess.emit({**rec, "error": str(e)})


def _recipe(path: Optional[str]) -> dict:
    if path is None:
        return {}
    from .images import read_png_text

    text = read_png_text(path)
    if "latentgen" not in text:
        raise InputError(f"{path}: has no latentgen recipe (it was not made by latentgen)")
    try:
        return json.loads(text["latentgen"])
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: damaged latentgen recipe ({e})") from e


def _recipe_run(rec: dict, seed, model, dtype: str, prediction, ema: bool) -> tuple:
    """Seed, model, dtype, prediction and EMA of a recipe, where the command line leaves them unset."""
    return (
        rec.get("seed") if seed is None else seed,
        model or rec.get("model_path") or rec.get("model"),
        rec.get("dtype", dtype) if dtype == "auto" else dtype,
        prediction or rec.get("prediction"),
        ema or bool(rec.get("ema")),
    )


@command()
def txt2img(
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or - to read prompts / JSON lines from stdin."),
    negative: Optional[str] = NegativeOpt,
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: Optional[str] = SamplerOpt,
    karras: Optional[bool] = KarrasOpt,
    spacing: Optional[str] = SpacingOpt,
    cfg: Optional[float] = CfgOpt,
    eta: Optional[float] = EtaOpt,
    seed: Optional[int] = SeedOpt,
    num: int = NumOpt,
    width: Optional[int] = WidthOpt,
    height: Optional[int] = HeightOpt,
    out: Optional[str] = OutOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    prediction: Optional[str] = PredictionOpt,
    config: Optional[str] = ConfigOpt,
    class_label: Optional[int] = ClassOpt,
    ema: bool = EmaOpt,
    low_memory: Optional[bool] = LowMemOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Regenerate the image whose PNG recipe this is."),
) -> None:
    """Generate images from text (or class labels, or nothing for unconditional models)."""
    rec = _recipe(recipe)
    if rec:
        prompt = rec.get("prompt", "") if prompt is None else prompt
        negative = rec.get("negative", "") if negative is None else negative
        class_label = rec.get("class") if class_label is None else class_label
        seed, model, dtype, prediction, ema = _recipe_run(rec, seed, model, dtype, prediction, ema)
    _check_num(num)
    sess = Session("txt2img", model, prediction, config, dtype, device, quiet, as_json, overwrite, out, ema, low_memory)
    from . import pipelines

    kind = sess.bundle.config.cond.kind
    if sess.bundle.config.concat is not None:
        task = "inpaint" if sess.bundle.config.concat == "inpaint" else "superres"
        raise ConfigError(
            f"model {sess.bundle.config.name} is an {sess.bundle.config.concat} model: use `latentgen {task}`"
        )
    if kind == "class" and class_label is None and prompt != "-":
        raise ConfigError(
            f"model {sess.bundle.config.name} is class-conditional: pass --class N "
            f"(0..{sess.bundle.config.cond.n_classes - 1})"
        )
    if kind in ("none", "class") and prompt not in (None, "", "-"):
        note(f"model {sess.bundle.config.name} takes no text ({kind} conditioning): the prompt is only recorded", quiet)
    items = sess.read_items(prompt)
    sess.check_outputs(items, num)
    defaults = sess.settings(steps, sampler, karras, spacing, cfg, eta, recipe=rec)
    w0, h0 = sess.size(width, height, rec)
    pipelines.check_size(sess.bundle, w0, h0)
    base = base_seed(seed, quiet)

    def make(item, seeds):
        st = sess.settings(
            item.get("steps", defaults.steps),
            item.get("sampler", defaults.sampler),
            defaults.karras,
            defaults.spacing,
            item.get("cfg", defaults.cfg),
            defaults.eta,
        )
        w, h = int(item.get("width", w0)), int(item.get("height", h0))
        text = item.get("prompt", "")
        neg = item.get("negative", negative or "")
        conds = [item.get("class", class_label)] * len(seeds) if kind == "class" else [text] * len(seeds)
        if kind == "class" and conds[0] is None:
            raise ConfigError('this model is class-conditional: give the item a "class" or pass --class N')
        bar = sess.progress(st.steps, text[:40] or "txt2img")
        try:
            imgs = pipelines.txt2img(sess.bundle, conds, [neg] * len(seeds), seeds, w, h, st, callback=bar)
        finally:
            bar.close()
        meta = {
            "task": "txt2img",
            "prompt": text,
            "negative": neg,
            "steps": st.steps,
            "sampler": st.sampler,
            "karras": st.karras,
            "spacing": st.spacing,
            "cfg": st.cfg,
            "eta": st.eta,
            "width": w,
            "height": h,
            "prediction": sess.bundle.config.prediction,
            "model_path": sess.model_path,
            "ema": ema,
        }
        if kind == "class":
            meta["class"] = conds[0]
        return imgs, meta

    run_generation(sess, items, base, num, make, {})
    sess.finish()


def _check_num(num: int) -> None:
    if num < 1:
        raise ConfigError(f"--num must be at least 1, not {num}")


def _check_image_size(sess: Session, x, what: str, scale: int = 1) -> None:
    """Image sides (× the model's upscaling) must be multiples of the model's size step."""
    from .pipelines import size_multiple

    m = size_multiple(sess.bundle) // scale
    w, h = x.shape[-1], x.shape[-2]
    if w % m or h % m:
        raise InputError(
            f"{what} is {w}x{h}: both sides must be multiples of {m} for model {sess.bundle.config.name} "
            f"(crop or resize it, e.g. to {max(m, w // m * m)}x{max(m, h // m * m)})"
        )


def _load_input_image(path: str):
    from .images import load_image, to_tensor

    return to_tensor(load_image(path))


def _parse_extend(extend: Optional[str]) -> tuple[int, int, int, int] | None:
    if not extend:
        return None
    try:
        vals = tuple(int(v) for v in extend.split(","))
        if len(vals) != 4 or min(vals) < 0:
            raise ValueError
    except ValueError:
        raise ConfigError(f"--extend must be four non-negative pixel counts L,T,R,B, not '{extend}'") from None
    return vals  # type: ignore[return-value]


def _outpaint_canvas(image, mask, extend):
    """Pad the canvas by L,T,R,B (edge colours) and mark the new border for repainting."""
    import torch.nn.functional as F

    left, top, right, bottom = extend
    image = F.pad(image, (left, right, top, bottom), mode="replicate")
    mask = F.pad(mask, (left, right, top, bottom), value=1.0)
    return image, mask


@command()
def img2img(
    image: str = typer.Argument(..., help="Input image."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or - for stdin."),
    strength: float = typer.Option(0.75, "--strength", help="How much to change the image, in (0, 1]."),
    negative: Optional[str] = NegativeOpt,
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: Optional[str] = SamplerOpt,
    karras: Optional[bool] = KarrasOpt,
    spacing: Optional[str] = SpacingOpt,
    cfg: Optional[float] = CfgOpt,
    eta: Optional[float] = EtaOpt,
    seed: Optional[int] = SeedOpt,
    num: int = NumOpt,
    out: Optional[str] = OutOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    prediction: Optional[str] = PredictionOpt,
    config: Optional[str] = ConfigOpt,
    ema: bool = EmaOpt,
    low_memory: Optional[bool] = LowMemOpt,
) -> None:
    """Change an image towards a prompt (SDEdit: encode, noise to the strength's σ, denoise the tail)."""
    _check_strength(strength)
    _check_num(num)
    init = _load_input_image(image)
    sess = Session("img2img", model, prediction, config, dtype, device, quiet, as_json, overwrite, out, ema, low_memory)
    from . import pipelines

    if sess.bundle.config.concat is not None:
        raise ConfigError(
            f"model {sess.bundle.config.name} is an {sess.bundle.config.concat} model: img2img needs an "
            "ordinary text-to-image model (--model)"
        )
    _check_image_size(sess, init, image)
    items = sess.read_items(prompt)
    sess.check_outputs(items, num)
    defaults = sess.settings(steps, sampler, karras, spacing, cfg, eta, strength)
    base = base_seed(seed, quiet)

    def make(item, seeds):
        st = sess.settings(
            item.get("steps", defaults.steps),
            item.get("sampler", defaults.sampler),
            defaults.karras,
            defaults.spacing,
            item.get("cfg", defaults.cfg),
            defaults.eta,
            item.get("strength", strength),
        )
        text, neg = item.get("prompt", ""), item.get("negative", negative or "")
        bar = sess.progress(st.steps, text[:40] or "img2img")
        try:
            imgs = pipelines.img2img(
                sess.bundle,
                init.expand(len(seeds), -1, -1, -1),
                [text] * len(seeds),
                [neg] * len(seeds),
                seeds,
                st,
                callback=bar,
            )
        finally:
            bar.close()
        return imgs, {
            "task": "img2img",
            "prompt": text,
            "negative": neg,
            "steps": st.steps,
            "sampler": st.sampler,
            "karras": st.karras,
            "spacing": st.spacing,
            "cfg": st.cfg,
            "eta": st.eta,
            "strength": st.strength,
            "width": init.shape[-1],
            "height": init.shape[-2],
            "init_image": image,
            "prediction": sess.bundle.config.prediction,
            "model_path": sess.model_path,
        }

    run_generation(sess, items, base, num, make, {})
    sess.finish()


def _check_strength(strength: float) -> None:
    if not 0.0 < strength <= 1.0:
        raise ConfigError(f"--strength must be in (0, 1], not {strength}")


@command()
def inpaint(
    image: str = typer.Argument(..., help="Input image."),
    prompt: Optional[str] = typer.Argument(None, help="The prompt, or - for stdin."),
    mask: Optional[str] = typer.Option(None, "--mask", help="Mask image: white = repaint, black = keep."),
    mask_blur: int = typer.Option(0, "--mask-blur", help="Gaussian blur radius for the mask, in pixels."),
    resize_mask: bool = typer.Option(False, "--resize-mask", help="Resize a mask of another size to the image."),
    extend: Optional[str] = typer.Option(None, "--extend", help="Outpaint: pad the canvas by L,T,R,B pixels."),
    strength: float = typer.Option(1.0, "--strength", help="For the repainted region, in (0, 1]."),
    negative: Optional[str] = NegativeOpt,
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: Optional[str] = SamplerOpt,
    karras: Optional[bool] = KarrasOpt,
    spacing: Optional[str] = SpacingOpt,
    cfg: Optional[float] = CfgOpt,
    eta: Optional[float] = EtaOpt,
    seed: Optional[int] = SeedOpt,
    num: int = NumOpt,
    out: Optional[str] = OutOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    prediction: Optional[str] = PredictionOpt,
    config: Optional[str] = ConfigOpt,
    ema: bool = EmaOpt,
    low_memory: Optional[bool] = LowMemOpt,
) -> None:
    """Repaint the white part of a mask (or the border added by --extend)."""
    import torch

    _check_strength(strength)
    ext = _parse_extend(extend)
    if mask is None and ext is None:
        raise ConfigError("inpaint needs --mask MASK or --extend L,T,R,B")
    if mask_blur < 0:
        raise ConfigError(f"--mask-blur must be >= 0, not {mask_blur}")
    _check_num(num)
    from .images import load_image, to_tensor

    init = _load_input_image(image)
    if mask is not None:
        m_im = load_image(mask, mode="L")
        size = (init.shape[-1], init.shape[-2])
        if m_im.size != size:
            if not resize_mask:
                raise InputError(
                    f"mask {mask} is {m_im.size[0]}x{m_im.size[1]} but the image is {size[0]}x{size[1]}: "
                    "pass a mask of the same size or --resize-mask"
                )
            m_im = m_im.resize(size)
        if mask_blur:
            from PIL import ImageFilter

            m_im = m_im.filter(ImageFilter.GaussianBlur(mask_blur))
        m = to_tensor(m_im)
    else:
        m = torch.zeros_like(init[:, :1])
    if ext is not None:
        init, m = _outpaint_canvas(init, m, ext)
    sess = Session("inpaint", model, prediction, config, dtype, device, quiet, as_json, overwrite, out, ema, low_memory)
    from . import pipelines

    if sess.bundle.config.concat == "lowres":
        raise ConfigError(f"model {sess.bundle.config.name} is a super-resolution model: use `latentgen superres`")
    _check_image_size(sess, init, image + (f" extended by {extend}" if extend else ""))
    items = sess.read_items(prompt)
    sess.check_outputs(items, num)
    defaults = sess.settings(steps, sampler, karras, spacing, cfg, eta, strength)
    base = base_seed(seed, quiet)

    def make(item, seeds):
        st = sess.settings(
            item.get("steps", defaults.steps),
            item.get("sampler", defaults.sampler),
            defaults.karras,
            defaults.spacing,
            item.get("cfg", defaults.cfg),
            defaults.eta,
            item.get("strength", strength),
        )
        text, neg = item.get("prompt", ""), item.get("negative", negative or "")
        n = len(seeds)
        bar = sess.progress(st.steps, text[:40] or "inpaint")
        try:
            imgs = pipelines.inpaint(
                sess.bundle,
                init.expand(n, -1, -1, -1),
                m.expand(n, -1, -1, -1),
                [text] * n,
                [neg] * n,
                seeds,
                st,
                callback=bar,
            )
        finally:
            bar.close()
        return imgs, {
            "task": "inpaint",
            "prompt": text,
            "negative": neg,
            "steps": st.steps,
            "sampler": st.sampler,
            "karras": st.karras,
            "spacing": st.spacing,
            "cfg": st.cfg,
            "eta": st.eta,
            "strength": st.strength,
            "width": init.shape[-1],
            "height": init.shape[-2],
            "init_image": image,
            "mask": mask,
            "mask_blur": mask_blur,
            "extend": extend,
            "prediction": sess.bundle.config.prediction,
            "model_path": sess.model_path,
        }

    run_generation(sess, items, base, num, make, {})
    sess.finish()


@command()
def superres(
    image: Optional[str] = typer.Argument(None, help="Low-resolution input image (default with --recipe: its input)."),
    scale: Optional[int] = typer.Option(
        None, "--scale", help="Upscaling factor; must equal the model's (4 for LDM-SR)."
    ),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p", help="What the image shows (text-guided upscalers: the SD 2 x4)."
    ),
    negative: Optional[str] = NegativeOpt,
    cfg: Optional[float] = CfgOpt,
    noise_level: Optional[int] = typer.Option(
        None,
        "--noise-level",
        help="SD 2 x4 upscaler: noise added to the low-res image, 0..max_noise_level (350); default 20.",
    ),
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = StepsOpt,
    sampler: Optional[str] = SamplerOpt,
    karras: Optional[bool] = KarrasOpt,
    spacing: Optional[str] = SpacingOpt,
    eta: Optional[float] = EtaOpt,
    seed: Optional[int] = SeedOpt,
    num: int = NumOpt,
    out: Optional[str] = OutOpt,
    dtype: str = DtypeOpt,
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
    overwrite: bool = OverwriteOpt,
    quiet: bool = QuietOpt,
    prediction: Optional[str] = PredictionOpt,
    config: Optional[str] = ConfigOpt,
    ema: bool = EmaOpt,
    low_memory: Optional[bool] = LowMemOpt,
    recipe: Optional[str] = typer.Option(None, "--recipe", help="Regenerate the image whose PNG recipe this is."),
) -> None:
    """Upscale an image: LDM-SR (low-res image concatenated to the latent) or the SD 2 x4 upscaler (also guided
    by --prompt, its input noised to --noise-level)."""
    from .config import load_registry

    rec = _recipe(recipe)
    if rec:
        if rec.get("task") != "superres":
            raise InputError(
                f"{recipe}: is a {rec.get('task')} image, not a superres one: pass a PNG made by `latentgen superres`"
            )
        image = image or rec.get("init_image")
        prompt = rec.get("prompt", "") if prompt is None else prompt
        negative = rec.get("negative", "") if negative is None else negative
        noise_level = rec.get("noise_level") if noise_level is None else noise_level
        seed, model, dtype, prediction, ema = _recipe_run(rec, seed, model, dtype, prediction, ema)
    if image is None:
        raise ConfigError("superres needs an IMAGE argument (or --recipe PNG)")
    if model is None:
        model = load_registry().get("default_superres") or model
    _check_num(num)
    low = _load_input_image(image)
    sess = Session(
        "superres", model, prediction, config, dtype, device, quiet, as_json, overwrite, out, ema, low_memory
    )
    from . import pipelines

    name = sess.bundle.config.name
    if sess.bundle.config.concat != "lowres":
        raise ConfigError(
            f"model {name} is not a super-resolution model (pass --model with an LDM-SR or SD 2 x4 upscaler checkpoint)"
        )
    level = pipelines.noise_level_for(sess.bundle, noise_level)
    text_guided = sess.bundle.config.cond.kind != "none"
    if not text_guided and (prompt or negative or cfg not in (None, 1.0)):
        raise ConfigError(
            f"model {name} takes no text: --prompt, --negative and --cfg need a text-guided upscaler (the SD 2 x4)"
        )
    f = sess.bundle.config.factor
    if scale is not None and scale != f:
        raise ConfigError(f"--scale {scale}: model {name} upscales by {f}")
    _check_image_size(sess, low, image, scale=f)
    sess.check_outputs([{}], num)
    defaults = sess.settings(steps, sampler, karras, spacing, cfg if text_guided else 1.0, eta, recipe=rec)
    base = base_seed(seed, quiet)
    text, neg = prompt or "", negative or ""

    def make(item, seeds):
        n = len(seeds)
        bar = sess.progress(defaults.steps, text[:40] or "superres")
        try:
            imgs = pipelines.superres(
                sess.bundle,
                low.expand(n, -1, -1, -1),
                seeds,
                defaults,
                callback=bar,
                prompts=[text] * n,
                negatives=[neg] * n,
                noise_level=level,
            )
        finally:
            bar.close()
        return imgs, {
            "task": "superres",
            "prompt": text,
            "negative": neg,
            "steps": defaults.steps,
            "sampler": defaults.sampler,
            "karras": defaults.karras,
            "spacing": defaults.spacing,
            "cfg": defaults.cfg,
            "eta": defaults.eta,
            "noise_level": level,
            "width": low.shape[-1] * f,
            "height": low.shape[-2] * f,
            "init_image": image,
            "prediction": sess.bundle.config.prediction,
            "model_path": sess.model_path,
            "ema": ema,
        }

    run_generation(sess, [{"prompt": text}], base, num, make, {})
    sess.finish()


@command()
def encode(
    image: str = typer.Argument(..., help="Image to encode."),
    out: str = typer.Option(..., "--out", "-o", help="Latent file to write (.safetensors)."),
    model: Optional[str] = ModelOpt,
    sample: bool = typer.Option(False, "--sample", help="KL: draw from the posterior instead of its mode."),
    seed: int = typer.Option(0, "--seed", help="Seed for --sample."),
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Encode an image into the model's (scaled) latent space; writes a safetensors file."""
    import torch

    from .checkpoint import load_first_stage, write_safetensors
    from .images import load_image, to_tensor

    _check_single_out(out, overwrite)
    x = to_tensor(load_image(image))
    fs = load_first_stage(model, device=pick_device(device))
    from .pipelines import encode_latents

    f = fs.factor
    if x.shape[-1] % f or x.shape[-2] % f:
        raise InputError(
            f"{image} is {x.shape[-1]}x{x.shape[-2]}: both sides must be multiples of the model's "
            f"factor {f} (crop or resize it)"
        )
    gens = [torch.Generator("cpu").manual_seed(seed)] if sample else None
    with torch.no_grad():
        z = encode_latents(fs.module, x * 2 - 1, gens) * fs.scale_factor
    write_safetensors(out, {"latent": z.float().cpu()}, fs.latent_metadata(tuple(z.shape)), overwrite=overwrite)
    print(out)


def _check_single_out(out: str, overwrite: bool) -> None:
    check_out_pattern(out, overwrite)
    if not overwrite and Path(out).exists():
        raise InputError(f"{out} exists: pass --overwrite to replace it")


@command()
def decode(
    latent: str = typer.Argument(..., help="Latent file written by `latentgen encode` (or any {latent: tensor})."),
    out: str = typer.Option(..., "--out", "-o", help="PNG to write."),
    model: Optional[str] = ModelOpt,
    overwrite: bool = OverwriteOpt,
    device: str = DeviceOpt,
    quiet: bool = QuietOpt,
) -> None:
    """Decode a latent file back into an image with a compatible first stage."""
    import torch

    from .checkpoint import load_first_stage, read_safetensors
    from .images import save_png, to_pil

    tensors, meta = read_safetensors(latent)
    if "latent" not in tensors:
        raise InputError(f"{latent}: no tensor named 'latent' (write it with `latentgen encode`)")
    z = tensors["latent"]
    n = z.shape[0] if z.ndim == 4 else 1
    paths = [out.format(i=i) for i in range(n)] if "{i" in out else [out]
    if len(paths) != n:
        raise ConfigError(f"{latent} holds {n} latents: give --out a {{i}} field, e.g. --out 'img-{{i}}.png'")
    for p in paths:
        _check_single_out(p, overwrite)
    fs = load_first_stage(model, device=pick_device(device))
    fs.check_latent(z, meta, latent)
    from .pipelines import decode_latents

    with torch.no_grad():
        img = (decode_latents(fs.module, z / fs.scale_factor).float() / 2 + 0.5).clamp(0, 1)
    for p, im in zip(paths, img):
        save_png(
            to_pil(im),
            p,
            text={"latentgen": json.dumps({"task": "decode", "latent": latent, "model": fs.name})},
            overwrite=overwrite,
        )
        print(p)


def _register_training() -> None:
    """train-ae / train-ldm from cli_train (written separately), imported only if it exists: it must not
    import torch at module level, so that `latentgen --help` stays fast."""
    from importlib.util import find_spec

    if find_spec(f"{__package__}.cli_train") is None:
        return
    from . import cli_train

    command("train-ae")(cli_train.train_ae)
    command("train-ldm")(cli_train.train_ldm)


_register_training()


def main() -> None:
    """The `latentgen` console script: every command already turns errors into one line + exit 2."""
    guarded(app)()


if __name__ == "__main__":
    main()
