"""Training state: EMA weights (CompVis LitEma), optimizer tensors and the step in `state.safetensors`
(never a pickle), and exact resume."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError, InputError
from .options import STATE_FILE, STATE_FORMAT, RunOptions


class EMA:
    """Exponential moving average of a module's weights (CompVis ldm/modules/ema.py LitEma): the decay warms
    up as min(decay, (1 + n) / (10 + n)) over the n updates so far; buffers are copied."""

    def __init__(self, module: nn.Module, decay: float):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        self.decay, self.num_updates = float(decay), 0

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        own = dict(self.module.named_parameters())
        params = list(module.named_parameters())
        torch._foreach_lerp_([own[n] for n, _ in params], [p.detach() for _, p in params], 1 - d)
        own_buffers = dict(self.module.named_buffers())
        for name, b in module.named_buffers():
            own_buffers[name].copy_(b)


def _optimizer_tensors(name: str, opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if torch.is_tensor(v):
                tensors[f"opt.{name}.{idx}.{key}"] = v
            else:
                scalars[f"{idx}.{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _restore_optimizer(name: str, opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    prefix = f"opt.{name}."
    for key, v in tensors.items():
        if key.startswith(prefix):
            idx, what = key[len(prefix) :].split(".", 1)
            state.setdefault(int(idx), {})[what] = v.clone()
    for key, v in meta["scalars"].items():
        idx, what = key.split(".", 1)
        state.setdefault(int(idx), {})[what] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_state(path: Path, *, step: int, modules: dict, optimizers: dict, emas: dict, meta: dict) -> None:
    """The training state: weights, EMA weights, optimizer moments, torch RNG (safetensors) + JSON metadata."""
    from ..loading.safetensors import write_safetensors

    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    info = {"format": STATE_FORMAT, "step": str(step)}
    for name, m in modules.items():
        tensors.update({f"model.{name}.{k}": v for k, v in m.state_dict().items()})
    for name, ema in emas.items():
        tensors.update({f"ema.{name}.{k}": v for k, v in ema.module.state_dict().items()})
        info[f"ema.{name}.num_updates"] = str(ema.num_updates)
    for name, opt in optimizers.items():
        t, m = _optimizer_tensors(name, opt)
        tensors.update(t)
        info[f"opt.{name}"] = json.dumps(m)
    info.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    write_safetensors(path, tensors, info)


@dataclass
class TrainState:
    path: Path
    step: int
    tensors: dict
    meta: dict

    def json(self, key: str):
        return json.loads(self.meta[key])

    def load_module(self, name: str, module: nn.Module) -> None:
        from ..loading.layout import load_strict, split_prefix

        load_strict(
            module,
            {k: v.clone() for k, v in split_prefix(self.tensors, f"model.{name}.").items()},
            what=name,
            source=str(self.path),
        )

    def restore(self, *, optimizers: dict, emas: dict) -> None:
        from ..loading.layout import load_strict, split_prefix

        for name, ema in emas.items():
            sd = {k: v.clone() for k, v in split_prefix(self.tensors, f"ema.{name}.").items()}
            load_strict(ema.module, sd, what=f"EMA {name}", source=str(self.path))
            ema.num_updates = int(self.meta[f"ema.{name}.num_updates"])
        for name, opt in optimizers.items():
            _restore_optimizer(name, opt, self.tensors, self.json(f"opt.{name}"))
        torch.set_rng_state(self.tensors["rng.torch"])


def read_state(folder: str | Path) -> TrainState:
    from ..loading.safetensors import read_safetensors

    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"--resume {folder}: no {STATE_FILE} there (not a latentgen training folder)")
    tensors, meta = read_safetensors(path)
    if meta.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path}: not a latentgen training state (format {meta.get('format')!r})")
    return TrainState(path, int(meta["step"]), tensors, meta)


def check_resume(state: TrainState, kind: str, opts: RunOptions) -> None:
    """--resume must repeat the run's options (those that change what is computed)."""
    if state.meta.get("kind") != kind:
        raise ConfigError(f"--resume {state.path.parent}: that folder holds a {state.meta.get('kind')} run, not {kind}")
    old, new = state.json("run"), json.loads(json.dumps(opts.identity()))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            flag = "--" + key.replace("_", "-")
            raise ConfigError(
                f"--resume {state.path.parent}: {flag} was {old.get(key)!r} in that run but is {new.get(key)!r} "
                f"now; repeat the run's options or start a new run in another --out"
            )


def prepare_out(opts: RunOptions) -> tuple[Path, TrainState | None]:
    """The output folder, and the state to resume from. Refuses to mix runs: nothing is written here."""
    if opts.resume is None and opts.out is None:
        raise ConfigError("--out DIR is required (or --resume DIR to continue a run)")
    out = Path(opts.out or opts.resume)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; pass a folder")
    state = read_state(opts.resume) if opts.resume is not None else None
    same = state is not None and out.resolve() == Path(opts.resume).resolve()
    if out.is_dir() and any(out.iterdir()) and not same and not opts.overwrite:
        raise InputError(
            f"--out {out} already holds files of another run; pass --resume {out} to continue it or --overwrite "
            "to start over"
        )
    return out, state
