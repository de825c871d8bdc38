"""train-ae / train-ldm on tiny models and 16 px shapes: losses fall, checkpoints load and sample, exact resume,
2-process gloo data parallelism == one process, atomic checkpoints, Ctrl-C, and every bad-input path."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentgen import pipelines
from latentgen.errors import CheckpointError, ConfigError, InputError
from latentgen.loading.bundle import load_first_stage, load_model
from latentgen.loading.safetensors import read_safetensors
from latentgen.training.autoencoder import train_autoencoder
from latentgen.training.ldm import train_ldm
from latentgen.training.losses import LPIPS, LaplacianPyramidLoss, load_lpips
from latentgen.training.options import AEOptions, LDMOptions
from latentgen.training.state import read_state

TINY_AE = dict(
    size=16,
    f=2,
    ch=32,
    ch_mult=(1, 2),
    embed_dim=3,
    disc_layers=2,
    disc_ch=16,
    batch_size=4,
    log_every=1000,
    save_every=1000,
)
TINY_LDM = dict(
    size=16,
    model_channels=32,
    channel_mult=(1, 2),
    attention_resolutions=(2,),
    num_head_channels=16,
    text_dim=32,
    text_layers=1,
    text_heads=2,
    class_dim=32,
    log_every=1000,
    save_every=1000,
    sample_steps=2,
)
QUIET = dict(log=lambda msg: None)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest single-threaded on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def first_last(losses: list[dict], key: str, k: int = 5) -> tuple[float, float]:
    vals = [row[key] for row in losses]
    return sum(vals[:k]) / k, sum(vals[-k:]) / k


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae")
    train_autoencoder(AEOptions(data="shapes:8", out=str(out), steps=3, lr=1e-3, disc_start=100, **TINY_AE), **QUIET)
    return out / "autoencoder.safetensors"


def ldm_opts(tmp_path: Path, ae: Path, **kw) -> LDMOptions:
    base = dict(data="shapes:8", out=str(tmp_path / "run"), ae=str(ae), batch_size=4, steps=4, lr=1e-3, **TINY_LDM)
    base.update(kw)
    return LDMOptions(**base)


# ------------------------------------------------------------------------------------------- train-ae


def test_train_ae_kl_loss_falls_and_loads(tmp_path):
    out = tmp_path / "kl"
    res = train_autoencoder(
        AEOptions(data="shapes:4", out=str(out), steps=16, lr=2e-3, disc_start=10, sample_every=16, **TINY_AE), **QUIET
    )
    first, last = first_last(res.losses[:10], "rec", 3)  # before the discriminator starts
    assert last < 0.7 * first, [round(r["rec"], 3) for r in res.losses]
    assert "g" in res.losses[-1] and "d" in res.losses[-1] and "g" not in res.losses[0]  # discriminator from step 10
    tensors, meta = read_safetensors(out / "autoencoder.safetensors")
    assert all(k.startswith("first_stage_model.") for k in tensors)
    assert meta["perceptual_loss"] == "laplacian-pyramid-l1"
    fs = load_first_stage(str(out / "autoencoder.safetensors"))
    assert fs.cfg.kind == "kl" and fs.factor == 2
    assert fs.scale_factor == pytest.approx(json.loads(meta["autoencoder"])["scale_factor"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = fs.encode_latent(x) * fs.scale_factor
    assert z.shape == (2, 3, 8, 8) and fs.decode_scaled(z).shape == (2, 3, 16, 16)
    assert (out / "samples" / "step-0000016.png").is_file()


def test_train_ae_vq_via_cli(tmp_path):
    import typer
    from typer.testing import CliRunner

    from latentgen.cli.train import train_ae

    app = typer.Typer()
    app.command("train-ae")(train_ae)
    app.command("other")(lambda: None)
    args = [
        "train-ae",
        "--data",
        "shapes:4",
        "--reg",
        "vq",
        "--f",
        "2",
        "--out",
        str(tmp_path / "vq"),
        "--size",
        "16",
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--ch",
        "32",
        "--ch-mult",
        "1,2",
        "--embed-dim",
        "3",
        "--n-embed",
        "32",
        "--lr",
        "2e-3",
        "--disc-start",
        "100",
        "--log-every",
        "1",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("autoencoder.safetensors")
    assert "perceptual loss: laplacian-pyramid-l1" in result.stderr and "it/s" in result.stderr
    fs = load_first_stage(str(tmp_path / "vq" / "autoencoder.safetensors"))
    assert fs.cfg.kind == "vq" and fs.cfg.n_embed == 32
    state = read_state(tmp_path / "vq")
    assert state.step == 12
    recs = [{"rec": float(m)} for m in re.findall(r"  rec ([-+.e\d]+)", result.stderr)]
    assert len(recs) == 12
    first, last = first_last(recs, "rec", 4)
    assert last < 0.7 * first, (first, last)


# ------------------------------------------------------------------------------------------ train-ldm


@pytest.mark.parametrize("cond", ["text", "class", "sr", "inpaint"])
def test_train_ldm_loss_falls_and_samples(tmp_path, tiny_ae, cond):
    opts = ldm_opts(
        tmp_path, tiny_ae, data="shapes:4", cond=cond, steps=20, lr=3e-3, prediction="v" if cond == "sr" else "eps"
    )
    res = train_ldm(opts, **QUIET)
    first, last = first_last(res.losses, "loss")
    assert last < 0.9 * first, (first, last)
    bundle = load_model(str(res.model_path))
    cfg = bundle.config
    fs = load_first_stage(str(tiny_ae))
    assert cfg.scale_factor != pytest.approx(fs.scale_factor)  # measured on the data, not copied
    settings = pipelines.Settings(steps=2, cfg=2.0)
    images = torch.rand(2, 3, 16, 16)
    if cond == "sr":
        assert cfg.concat == "lowres" and cfg.prediction == "v" and bundle.unet.config.in_channels == 6
        img = pipelines.superres(bundle, images[:, :, :8, :8], [0, 1], settings)
    elif cond == "inpaint":
        assert cfg.concat == "inpaint" and cfg.cond.kind == "bert" and bundle.unet.config.in_channels == 7
        masks = torch.zeros(2, 1, 16, 16)
        masks[..., 4:12, 4:12] = 1
        img = pipelines.inpaint(bundle, images, masks, ["a red circle"] * 2, ["", ""], [0, 1], settings)
    elif cond == "class":
        assert cfg.cond.kind == "class" and cfg.cond.null_label == 24
        img = pipelines.txt2img(bundle, ["3", "7"], ["", ""], [0, 1], 16, 16, settings)
    else:
        assert cfg.cond.kind == "bert"
        img = pipelines.txt2img(bundle, ["a red circle", "a blue square"], ["", ""], [0, 1], 16, 16, settings)
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()


def test_cached_latents_match_encoding_every_step(tmp_path, tiny_ae, monkeypatch):
    """--cache-latents keeps each item's posterior moments after its first epoch and only redraws the noise:
    the same losses as encoding every step, with the encoder run once per item."""
    from latentgen.autoencoder import AutoencoderKL

    calls = []
    encode = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x: calls.append(x.shape[0]) or encode(self, x))
    runs = {}
    for cache, workers in ((False, 0), (True, 0), (True, 2)):
        calls.clear()
        opts = ldm_opts(
            tmp_path,
            tiny_ae,
            cond="text",
            steps=4,
            out=str(tmp_path / f"c{cache}{workers}"),
            cache_latents=cache,
            workers=workers,
            scale_batches=1,
        )
        runs[cache, workers] = (train_ldm(opts, **QUIET).losses, list(calls))
    (plain, plain_calls), (cached, cached_calls) = runs[False, 0], runs[True, 0]
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert [r["loss"] for r in runs[True, 2][0]] == pytest.approx([r["loss"] for r in plain], rel=1e-5)
    assert sum(plain_calls) == 4 + 4 * 4  # scale measurement + every step's batch of 4 (data: 8 items)
    assert sum(cached_calls) == 4 + 8  # scale measurement + each of the 8 items once


def test_time_budget_shrinks_steps(tmp_path, tiny_ae, monkeypatch):
    """--time-budget measures the speed over the probe steps and cuts --steps to what fits; the run then ends
    with a checkpoint of that step, and the log names the step count that reproduces it."""
    from latentgen.training.loop import Loop

    monkeypatch.setattr(Loop, "PROBE", (1, 3))
    lines = []
    res = train_ldm(ldm_opts(tmp_path, tiny_ae, steps=1000, time_budget=1e-3), log=lines.append)
    assert res.step == 3 and read_state(tmp_path / "run").step == 3
    assert any("time budget: 3 steps fit" in line and "--steps 3" in line for line in lines), lines
    res = train_ldm(ldm_opts(tmp_path, tiny_ae, steps=6, time_budget=3600, out=str(tmp_path / "ample")), **QUIET)
    assert res.step == 6  # a budget that is not tight changes nothing


def test_lr_decay_and_text_length(tmp_path, tiny_ae):
    from latentgen.training.loop import lr_at

    opts = ldm_opts(tmp_path, tiny_ae, cond="text", steps=100, warmup=10, lr_decay="cosine", text_length=16)
    lrs = [lr_at(opts, s) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4 * 1.0) and lrs[9] < 1e-3  # warm-up
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # then a monotone decay ...
    assert lrs[50] == pytest.approx(1e-3 * 0.55, rel=0.02) and lrs[99] == pytest.approx(1e-4, rel=0.01)  # to lr/10
    assert lr_at(ldm_opts(tmp_path, tiny_ae, steps=100), 99) == 1e-3  # constant by default
    res = train_ldm(ldm_opts(tmp_path, tiny_ae, cond="text", steps=1, lr_decay="cosine", text_length=16), **QUIET)
    bundle = load_model(str(res.model_path))
    assert bundle.config.cond.max_seq_len == 16 and bundle.cond.tokenize(["a red circle"]).shape == (1, 16)
    with pytest.raises(ConfigError, match="--lr-decay"):
        train_ldm(ldm_opts(tmp_path, tiny_ae, out=str(tmp_path / "x"), lr_decay="linear"), **QUIET)
    assert not (tmp_path / "x").exists()


def test_l2_weight_and_adam_betas(tmp_path):
    kw = dict(data="shapes:8", steps=1, disc_start=100, **TINY_AE)
    plain = train_autoencoder(AEOptions(out=str(tmp_path / "a"), **kw), **QUIET).losses[0]
    l2 = train_autoencoder(
        AEOptions(out=str(tmp_path / "b"), l2_weight=1.0, adam_betas=(0.9, 0.99), **kw), **QUIET
    ).losses[0]
    assert l2["rec"] == pytest.approx(plain["rec"], rel=1e-6)  # same weights and batch at step 1 ...
    assert l2["loss"] > plain["loss"] + 1.0  # ... plus the summed squared error
    assert read_state(tmp_path / "b").json("run")["adam_betas"] == [0.9, 0.99]
    grouped = train_autoencoder(AEOptions(out=str(tmp_path / "g"), norm_groups=8, **kw), **QUIET)
    fs = load_first_stage(str(grouped.model_path))  # the group count travels in the file's config
    assert fs.cfg.norm_groups == 8 and fs.module.decoder.norm_out.num_groups == 8
    with pytest.raises(ConfigError, match="--adam-betas"):
        train_autoencoder(AEOptions(out=str(tmp_path / "c"), adam_betas=(1.5, 0.9), **kw), **QUIET)
    assert not (tmp_path / "c").exists()


def _state_weights(folder: Path) -> dict:
    return {k: v for k, v in read_state(folder).tensors.items() if k.startswith(("model.", "ema."))}


def test_resume_is_exact(tmp_path, tiny_ae):
    straight = train_ldm(ldm_opts(tmp_path, tiny_ae, cond="class", out=str(tmp_path / "a"), steps=6), **QUIET)
    half = train_ldm(ldm_opts(tmp_path, tiny_ae, cond="class", out=str(tmp_path / "b"), steps=3), **QUIET)
    rest = train_ldm(ldm_opts(tmp_path, tiny_ae, cond="class", out=None, resume=str(tmp_path / "b"), steps=6), **QUIET)
    assert [r["step"] for r in rest.losses] == [4, 5, 6]
    assert half.losses + rest.losses == straight.losses
    a, b = _state_weights(tmp_path / "a"), _state_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_is_exact_autoencoder(tmp_path):
    kw = dict(data="shapes:8", lr=1e-3, disc_start=2, **TINY_AE)
    straight = train_autoencoder(AEOptions(out=str(tmp_path / "a"), steps=4, **kw), **QUIET)
    half = train_autoencoder(AEOptions(out=str(tmp_path / "b"), steps=2, **kw), **QUIET)
    rest = train_autoencoder(AEOptions(resume=str(tmp_path / "b"), steps=4, **kw), **QUIET)
    assert half.losses + rest.losses == straight.losses
    a, b = _state_weights(tmp_path / "a"), _state_weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


DDP_SCRIPT = """
import json, sys
import torch
from torch.nn.parallel import DistributedDataParallel
from latentgen.training import autoencoder, ldm
from latentgen.training.options import AEOptions, LDMOptions
kind, opts = sys.argv[1], json.loads(sys.argv[2])
wrapped = []
for trainer in (autoencoder.AETrainer, ldm.LDMTrainer):
    init = trainer.__post_init__
    def post(self, init=init):
        init(self)
        wrapped.extend(type(v).__name__ for k, v in vars(self).items() if k.endswith("_ddp"))
    trainer.__post_init__ = post
if kind == "ae":
    res = autoencoder.train_autoencoder(AEOptions(**opts), log=lambda m: None)
else:
    res = ldm.train_ldm(LDMOptions(**opts), log=lambda m: None)
print(json.dumps({"wrapped": wrapped, "losses": res.losses}))
"""


def _torchrun(tmp_path: Path, kind: str, opts) -> dict:
    """Run a trainer in 2 gloo processes: the class names of the modules it called for its training passes
    ("wrapped") and rank 0's losses."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(script), kind, json.dumps(vars(opts))], env=env, capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "deprecated" not in proc.stderr, proc.stderr[-3000:]  # e.g. DDP's broadcast_buffers on newer torch
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _state_weights(a), _state_weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst < 1e-5, worst


@pytest.mark.parametrize("cache", [False, True])
def test_two_gloo_processes_equal_one_process(tmp_path, tiny_ae, cache):
    """train-ldm under DistributedDataParallel (UNet and BERT each wrapped; BERT's unused to_logits left out):
    2 processes compute what 1 process computes with the same global batch. With --cache-latents each process
    encodes half of the items and both gather the whole cache."""
    kw = dict(cond="text", steps=3, batch_size=4, lr=1e-3, cond_drop=0.5, cache_latents=cache)
    one = ldm_opts(tmp_path, tiny_ae, out=str(tmp_path / "one"), micro_batch=2, **kw)
    train_ldm(one, **QUIET)
    run = _torchrun(tmp_path, "ldm", ldm_opts(tmp_path, tiny_ae, out=str(tmp_path / "two"), **kw))
    assert run["wrapped"] == ["DistributedDataParallel", "DistributedDataParallel"]
    _same_weights(tmp_path / "one", tmp_path / "two")
    assert read_state(tmp_path / "two").step == 3


def test_two_gloo_processes_equal_one_process_autoencoder(tmp_path):
    """train-ae under DistributedDataParallel, the discriminator from step 0 (the adaptive weight's autograd.grad
    on the wrapped decoder's last layer, the hinge loss as one wrapped forward), two micro-batches per process
    accumulated under no_sync: 2 processes give the losses and weights 1 process gives with the same global batch.
    (Biases whose gradient is zero in exact arithmetic, e.g. before a one-channel GroupNorm, get Adam steps from
    rounding noise that differs with the summation order; the discriminator's BatchNorm statistics are per
    process. Both are compared by what they affect: the losses.)"""
    kw = dict(TINY_AE, data="shapes:8", steps=3, batch_size=8, micro_batch=2, lr=1e-3, disc_start=0)
    one = train_autoencoder(AEOptions(out=str(tmp_path / "one"), **kw), **QUIET)
    run = _torchrun(tmp_path, "ae", AEOptions(out=str(tmp_path / "two"), **kw))
    assert run["wrapped"] == ["DistributedDataParallel", "DistributedDataParallel"]
    assert [r["step"] for r in run["losses"]] == [1, 2, 3] and "d" in run["losses"][0]
    for a, b in zip(one.losses, run["losses"]):
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) <= 1e-5 * max(1.0, abs(a[k])) for k in a), (a, b)
    wa, wb = _state_weights(tmp_path / "one"), _state_weights(tmp_path / "two")
    for k in ("model.ae.decoder.conv_out.weight", "model.disc.main.0.weight", "ema.ae.encoder.conv_in.weight"):
        assert (wa[k] - wb[k]).abs().max().item() < 1e-5, k


# ----------------------------------------------------------------------------- crash safety, Ctrl-C


def test_checkpoint_write_is_atomic_under_crash(tmp_path, tiny_ae, monkeypatch):
    run = tmp_path / "run"
    train_ldm(ldm_opts(tmp_path, tiny_ae, cond="class", steps=2, save_every=1), **QUIET)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}

    import safetensors.torch

    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise RuntimeError("simulated crash during write")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_ldm(ldm_opts(tmp_path, tiny_ae, cond="class", out=None, resume=str(run), steps=4, save_every=1), **QUIET)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # no temp files left, previous checkpoint untouched
    assert read_state(run).step == 2
    load_model(str(run / "model.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["INT", "TERM"])
def test_sigint_writes_checkpoint(tmp_path, tiny_ae, sig):
    def ctrl_c(step, terms):
        if step == 2:
            os.kill(os.getpid(), sig)

    res = train_ldm(ldm_opts(tmp_path, tiny_ae, cond="none", steps=50), callback=ctrl_c, **QUIET)
    assert res.interrupted and res.step == 2 and res.signal == sig  # the CLI exits 128 + signal: 130, 143
    assert read_state(tmp_path / "run").step == 2
    load_model(str(tmp_path / "run" / "model.safetensors"))


# ----------------------------------------------------------------------------------------- bad input


def _write_png(path: Path, size: int) -> None:
    from PIL import Image

    Image.new("RGB", (size, size), (200, 10, 10)).save(path)


@pytest.mark.parametrize("case", ["empty", "unreadable", "small", "captions"])
def test_bad_data_folders(tmp_path, tiny_ae, case):
    data = tmp_path / "data"
    data.mkdir()
    if case == "unreadable":
        (data / "a.png").write_bytes(b"not a png")
    elif case == "small":
        _write_png(data / "a.png", 8)
    elif case == "captions":
        _write_png(data / "a.png", 16)
    match = {
        "empty": "has no images",
        "unreadable": "cannot read image",
        "small": "smaller than the training size",
        "captions": "has no caption",
    }[case]
    with pytest.raises(InputError, match=match) as err:
        if case == "captions":
            train_ldm(ldm_opts(tmp_path, tiny_ae, data=str(data), cond="text"), **QUIET)
        else:
            train_autoencoder(AEOptions(data=str(data), out=str(tmp_path / "run"), steps=1, **TINY_AE), **QUIET)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_ae_that_is_not_an_autoencoder(tmp_path):
    bogus = tmp_path / "bogus.safetensors"
    save_file({"some.weight": torch.zeros(2)}, str(bogus))
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    for path in (bogus, text):
        with pytest.raises(CheckpointError, match="--ae") as err:
            train_ldm(ldm_opts(tmp_path, path, cond="none"), **QUIET)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "run").exists()


def test_resume_with_other_options_and_occupied_out(tmp_path, tiny_ae):
    train_ldm(ldm_opts(tmp_path, tiny_ae, cond="none", steps=1), **QUIET)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="--lr"):
        train_ldm(ldm_opts(tmp_path, tiny_ae, cond="none", steps=2, lr=5e-4, out=None, resume=str(run)), **QUIET)
    with pytest.raises(ConfigError, match="--cond"):
        train_ldm(ldm_opts(tmp_path, tiny_ae, cond="class", steps=2, out=None, resume=str(run)), **QUIET)
    with pytest.raises(ConfigError, match="autoencoder"):
        train_autoencoder(AEOptions(data="shapes:8", resume=str(run), steps=2, **TINY_AE), **QUIET)
    with pytest.raises(InputError, match="--resume .* or --overwrite"):
        train_ldm(ldm_opts(tmp_path, tiny_ae, cond="none", steps=2), **QUIET)
    with pytest.raises(CheckpointError, match="no state.safetensors"):
        train_ldm(ldm_opts(tmp_path, tiny_ae, cond="none", steps=2, resume=str(tmp_path)), **QUIET)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before


# ------------------------------------------------------------------------------------ perceptual losses


def test_lpips_loads_torchvision_vgg16_keys(tmp_path):
    expected = {
        f"features.{i}.{w}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28) for w in ("weight", "bias")
    }
    lp = LPIPS()
    assert set(lp.net.state_dict()) == expected
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in lp.net.state_dict().items()}
    sd["classifier.0.weight"] = torch.zeros(2, 2)  # the rest of a torchvision file is ignored
    path = tmp_path / "vgg.safetensors"
    save_file(sd, str(path))
    uniform = load_lpips(str(path))
    assert uniform.heads == "uniform"
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert uniform(x, x).abs().max() < 1e-6 and (uniform(x, y) > 0).all()
    heads = {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate((64, 128, 256, 512, 512))
    }
    save_file({**sd, **heads}, str(path))
    learned = load_lpips(str(path))
    assert learned.heads == "lpips" and torch.equal(learned.lin3.model[1].weight, heads["lin3.model.1.weight"])
    assert not torch.allclose(learned(x, y), uniform(x, y))


def test_laplacian_pyramid_loss():
    loss = LaplacianPyramidLoss()
    x = torch.rand(2, 3, 16, 16)
    assert loss(x, x).abs().max() == 0
    shifted = loss(x, x + 0.1)  # a constant offset lives only in the coarsest level
    assert torch.allclose(shifted.flatten(), torch.full((2,), 0.1), atol=1e-5)


@pytest.mark.parametrize(
    "args, match",
    [
        (["train-ae", "--adam-betas", "0.9,x"], "--adam-betas takes"),
        (["train-ae", "--adam-betas", "0.9"], "--adam-betas takes two"),
        (["train-ae", "--norm-groups", "7"], "multiples of --norm-groups 7"),
        (["train-ldm", "--lr-decay", "linear"], "--lr-decay must be"),
        (["train-ldm", "--time-budget", "-1"], "--time-budget must be"),
        (["train-ldm", "--workers", "-2"], "--workers must be"),
    ],
)
def test_bad_training_options_one_line(tmp_path, args, match):
    from typer.testing import CliRunner

    from latentgen.cli.app import app

    result = CliRunner().invoke(app, args + ["--data", "shapes:4", "--out", str(tmp_path / "run"), "--steps", "1"])
    assert result.exit_code == 2, result.output
    assert match in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_fine_tune_from_an_fp16_model_file_saves_a_loadable_model(tmp_path, tiny_ae):
    """--init from a model saved in fp16 (as the shipped defaults are): the fine-tune starts from its weights and
    its model.safetensors loads strictly, with the frozen autoencoder's weights unchanged. (Loading a file for
    generation keeps the image encoder's fp16 weights behind a parametrization; the trainer must not save those
    names.)"""
    from latentgen.loading.bundle import load_model

    first = ldm_opts(tmp_path, tiny_ae, out=str(tmp_path / "first"), steps=2, save_dtype="float16")
    train_ldm(first, **QUIET)
    init = tmp_path / "first" / "model.safetensors"
    tune = ldm_opts(tmp_path, tiny_ae, out=str(tmp_path / "tune"), init=str(init), steps=2, lr=0.0)
    tune.ae = None
    train_ldm(tune, **QUIET)
    b = load_model(str(tmp_path / "tune" / "model.safetensors"))  # strict loading, for generation
    a, b = (load_model(str(f), dtype=None) for f in (init, tmp_path / "tune" / "model.safetensors"))
    for ma, mb in ((a.first_stage, b.first_stage), (a.unet, b.unet)):  # lr 0: nothing moved
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
