"""LoRA / LyCORIS on SDXL (base from the sgm fixture, a tiny refiner): kohya files in diffusers and original UNet
names and a PEFT file of the same random delta (UNet, CLIP-L and bigG) against diffusers' StableDiffusionXLPipeline
load_lora_weights + fuse_lora (8-bit images within 1 level on 99.9% of the values), LoHa / LoKr on SDXL layers
against their formulas written here, the CLI (options, tags, per-item LoRAs, metadata) and bad files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sdxl_reference import BASE, SDXL_DIR, fixture_ckpt, sgm_config

from latentgen import pipelines
from latentgen.adapters.lora import AdapterWarning, Merged, lora_deltas
from latentgen.errors import CheckpointError
from latentgen.images import read_png_text, to_pil
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from test_cli import cli, json_lines, pixels  # noqa: E402
from test_pipelines import assert_images_match  # noqa: E402
from test_sdxl_pipelines import _pipe  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not BASE.exists(), reason=f"SDXL fixtures not found at {SDXL_DIR}"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
RANK, ALPHA = 4, 2.0
H, W = 32, 48
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut")
UNET_TARGETS += ("add_embedding.linear_1", "add_embedding.linear_2", "time_embedding.linear_1")
TE_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1")


def original_names(unet) -> dict[str, str]:
    """diffusers UNet module name → sgm (original) module name, from diffusers' own checkpoint conversion: each
    converted tensor is the original one, so the data pointers pair them."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm

    ckpt = fixture_ckpt()
    orig = {k: v for k, v in ckpt.items() if k.startswith("model.diffusion_model.")}
    config = create_unet_diffusers_config_from_ldm(sgm_config(), ckpt)
    config.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)  # as reference
    converted = convert_ldm_unet_checkpoint(orig, config)
    by_ptr = {v.data_ptr(): k for k, v in orig.items()}
    out = {}
    for key, v in converted.items():
        if key.endswith(".weight"):
            out[key.removesuffix(".weight")] = by_ptr[v.data_ptr()].removeprefix("model.diffusion_model.")
    return {d: o.removesuffix(".weight") for d, o in out.items()}


def random_sdxl_lora(components, seed=0, original=True):
    """{format: state dict} of one random delta on diffusers' modules: kohya with diffusers UNet names, kohya with
    the original (sgm) UNet names kohya's SDXL trainer writes, and PEFT (alpha/rank folded into lora_B) with the
    prefixes StableDiffusionXLPipeline.save_lora_weights writes."""
    g = torch.Generator().manual_seed(seed)
    orig = original_names(components["unet"]) if original else {}  # the fixture's UNet only
    files = {"kohya": {}, "kohya_original": {}, "peft": {}}
    parts = [("unet", "unet", UNET_TARGETS), ("text_encoder", "te1", TE_TARGETS), ("text_encoder_2", "te2", TE_TARGETS)]
    for comp, kohya_part, targets in parts:
        model = components[comp]
        if model is None:
            continue
        for name, m in model.named_modules():
            if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or not name.endswith(targets):
                continue
            w = m.weight
            tail = w.shape[2:]
            down = torch.randn(RANK, w.shape[1], *tail, generator=g) * 0.3 / w[0].numel() ** 0.5
            up = torch.randn(w.shape[0], RANK, *[1] * len(tail), generator=g) * 0.3
            te_name = name if name.startswith("text_model.") else "text_model." + name
            names = (
                {"kohya": name, "kohya_original": orig.get(name)} if comp == "unet" else dict.fromkeys(files, te_name)
            )
            for fmt in ("kohya", "kohya_original"):
                if (fmt == "kohya" and name.startswith("add_embedding")) or names[fmt] is None:
                    continue  # diffusers' kohya converter mangles add_embedding_linear_N (kohya writes label_emb_0_N)
                key = f"lora_{kohya_part}_" + names[fmt].replace(".", "_")
                files[fmt][key + ".lora_down.weight"], files[fmt][key + ".lora_up.weight"] = down, up
                files[fmt][key + ".alpha"] = torch.tensor(ALPHA)
            files["peft"][f"{comp}.{name}.lora_A.weight"] = down
            files["peft"][f"{comp}.{name}.lora_B.weight"] = up * (ALPHA / RANK)
    return files


@pytest.mark.parametrize("fmt", ["kohya", "kohya_original", "peft"])
def test_sdxl_lora_matches_diffusers_fuse_lora(base, components, tmp_path, fmt):
    files = random_sdxl_lora(components, seed=1)
    path = tmp_path / f"{fmt}.safetensors"
    save_file(files[fmt], str(path))
    prompts, seeds = ["a lighthouse at dusk"], [5]
    st = Settings(steps=3, sampler="euler", karras=False, cfg=5.0)
    before = pipelines.txt2img(base, prompts, [""], seeds, W, H, st)

    pipe = _pipe("StableDiffusionXLPipeline", components, "euler", False)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    ref = pipe(prompts, height=H, width=W, num_inference_steps=3, guidance_scale=5.0, generator=gens, output_type="np")
    pipe.unfuse_lora()
    pipe.unload_lora_weights()

    deltas = lora_deltas(base, files[fmt], str(path))
    assert {d.part for d in deltas} == {"unet", "te", "te2"}
    assert len(deltas) == len(files[fmt]) // (3 if fmt.startswith("kohya") else 2)  # every layer matched
    merged = Merged()
    merged.set([(d, 0.8) for d in deltas])
    try:
        ours = pipelines.txt2img(base, prompts, [""], seeds, W, H, st)
    finally:
        merged.restore()
    assert_images_match(ours, ref.images)
    assert (ours - before).abs().max() > 0.05  # the LoRA changes the image
    assert torch.equal(pipelines.txt2img(base, prompts, [""], seeds, W, H, st), before)


def test_sdxl_text_encoder_multiplier_reaches_both_encoders(base, components):
    """A1111's <lora:NAME:TE:UNET>: the TE weight moves CLIP-L and bigG; each encoder's delta lands on its own
    layers (te1 on embedders.0, te2 on the bigG tower)."""
    files = random_sdxl_lora(components, seed=2)
    deltas = lora_deltas(base, files["kohya"], "k")
    l_layers = {id(m) for m in base.cond.clip_l.modules()}
    g_layers = {id(m) for m in base.cond.bigg.modules()}
    assert {id(d.module) for d in deltas if d.part == "te"} <= l_layers
    assert {id(d.module) for d in deltas if d.part == "te2"} <= g_layers
    q = base.cond.bigg.tower.text_model.encoder.layers[0].self_attn.q_proj
    key = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj"
    want = files["kohya"][key + ".lora_up.weight"] @ files["kohya"][key + ".lora_down.weight"] * (ALPHA / RANK)
    before = q.weight.clone()
    merged = Merged()
    merged.set([(d, 0.5) for d in deltas if d.part != "unet"])
    try:
        assert torch.allclose(q.weight - before, 0.5 * want, atol=1e-6)
    finally:
        merged.restore()
    assert torch.equal(q.weight, before)


@pytest.mark.parametrize("variant", ["sdxl-base", "sdxl-refiner"])
def test_diffusers_names_on_full_size_sdxl_layouts(variant):
    """On the full-size base (2 res blocks, depth 0/2/10) and refiner (4 levels, depth 4) key lists, on meta: every
    UNet linear and conv gets the name diffusers' own checkpoint conversion gives its weight (tensors paired by
    identity)."""
    import json

    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, create_unet_diffusers_config_from_ldm
    from test_sdxl_loading import _meta_raw

    from latentgen.adapters.lora import diffusers_unet_name
    from latentgen.loading.bundle import bundle_from_raw

    raw, _ = _meta_raw(f"{variant}-keys.json")
    bundle = bundle_from_raw(raw, device=None, dtype=None)
    orig = {k: v for k, v in raw.tensors.items() if k.startswith("model.diffusion_model.")}
    cfg = create_unet_diffusers_config_from_ldm(
        sgm_config(json.loads((SDXL_DIR / f"{variant}-config.json").read_text())), raw.tensors
    )
    cfg.update(class_embed_type=None, addition_embed_type="text_time", addition_time_embed_dim=256)
    by_id = {id(v): k.removeprefix("model.diffusion_model.") for k, v in orig.items()}
    theirs = {
        by_id[id(v)].removesuffix(".weight"): k.removesuffix(".weight")
        for k, v in convert_ldm_unet_checkpoint(orig, cfg).items()
        if k.endswith(".weight") and id(v) in by_id
    }
    layers = [n for n, m in bundle.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert len(layers) > 500 and "label_emb.0.0" in layers
    assert {n: diffusers_unet_name(n, bundle.unet) for n in layers} == {n: theirs[n] for n in layers}


# ---------------------------------------------------------------------------------------------- LyCORIS


def test_loha_lokr_on_sdxl_layers_equal_their_formulas(base):
    """LoHa (FedPara) ΔW = (w1a w1b) ∘ (w2a w2b) · α/r on a bigG projection and an original-named UNet attention
    layer; LoKr ΔW = w1 ⊗ w2 on SDXL's label_emb (diffusers' add_embedding name); .diff on CLIP-L."""
    g = torch.Generator().manual_seed(3)
    gq = base.cond.bigg.tower.text_model.encoder.layers[1].self_attn.k_proj
    uq = base.unet.input_blocks[5][1].transformer_blocks[1].attn2.to_v
    lab = base.unet.label_emb[0][0]
    lfc = base.cond.clip_l.text_model.encoder.layers[0].mlp.fc2
    sd, want = {}, {}
    for key, m in (
        ("lora_te2_text_model_encoder_layers_1_self_attn_k_proj", gq),
        ("lora_unet_input_blocks_5_1_transformer_blocks_1_attn2_to_v", uq),
    ):
        out, inp = m.weight.shape
        a1, b1 = torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g) * 0.1
        a2, b2 = torch.randn(out, 2, generator=g), torch.randn(2, inp, generator=g) * 0.1
        sd |= {f"{key}.hada_w1_a": a1, f"{key}.hada_w1_b": b1, f"{key}.hada_w2_a": a2, f"{key}.hada_w2_b": b2}
        sd[f"{key}.alpha"] = torch.tensor(1.0)
        # w[i, j] = Σ_k a1[i, k] b1[k, j] · Σ_k a2[i, k] b2[k, j] · α/r, as element-wise sums
        want[id(m)] = (a1[:, :, None] * b1[None]).sum(1) * (a2[:, :, None] * b2[None]).sum(1) * 0.5
    out, inp = lab.weight.shape
    w1, w2 = torch.randn(4, 2, generator=g) * 0.1, torch.randn(out // 4, inp // 2, generator=g) * 0.1
    sd["lora_unet_add_embedding_linear_1.lokr_w1"], sd["lora_unet_add_embedding_linear_1.lokr_w2"] = w1, w2
    want[id(lab)] = torch.cat([torch.cat([w1[i, j] * w2 for j in range(2)], 1) for i in range(4)], 0)
    diff = torch.randn(*lfc.weight.shape, generator=g) * 0.01
    sd["lora_te1_text_model_encoder_layers_0_mlp_fc2.diff"] = diff
    want[id(lfc)] = diff
    base_w = {id(m): m.weight.clone() for m in (gq, uq, lab, lfc)}
    merged = Merged()
    merged.set([(d, 1.0) for d in lora_deltas(base, sd, "lyco")])
    try:
        for m in (gq, uq, lab, lfc):
            assert (m.weight - base_w[id(m)] - want[id(m)]).abs().max() <= 1e-5
    finally:
        merged.restore()
    assert all(torch.equal(m.weight, base_w[id(m)]) for m in (gq, uq, lab, lfc))


# ---------------------------------------------------------------------------------------------- refiner and families


@pytest.fixture(scope="module")
def refiner(components, tmp_path_factory):
    from sdxl_reference import tiny_refiner
    from test_pipelines import _scheduler

    folder = tmp_path_factory.mktemp("refiner") / "d"
    parts = tiny_refiner(components, folder, _scheduler("euler", False, "epsilon"))
    return load_model(str(folder)), parts


def test_refiner_lora_matches_diffusers_fuse_lora(refiner, tmp_path):
    """A PEFT file on the refiner's UNet (4 levels, attention at 1 and 2) and bigG (text_encoder_2 only) against
    StableDiffusionXLImg2ImgPipeline + fuse_lora."""
    bundle, parts = refiner
    sd = random_sdxl_lora(parts, seed=6, original=False)["peft"]
    assert any(k.startswith("text_encoder_2.") for k in sd) and not any(k.startswith("text_encoder.") for k in sd)
    path = tmp_path / "refiner-lora.safetensors"
    save_file(sd, str(path))
    pipe = _pipe(
        "StableDiffusionXLImg2ImgPipeline",
        parts,
        "euler",
        False,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(7))
    gens = [torch.Generator("cpu").manual_seed(9)]
    ref = pipe(
        ["a boat"], image=img, strength=0.5, num_inference_steps=6, guidance_scale=5.0, generator=gens, output_type="np"
    )
    deltas = lora_deltas(bundle, sd, str(path))
    assert {d.part for d in deltas} == {"unet", "te2"} and len(deltas) == len(sd) // 2
    st = Settings(steps=6, sampler="euler", karras=False, cfg=5.0, strength=0.5)
    before = pipelines.img2img(bundle, img, ["a boat"], [""], [9], st)
    merged = Merged()
    merged.set([(d, 0.8) for d in deltas])
    try:
        ours = pipelines.img2img(bundle, img, ["a boat"], [""], [9], st)
    finally:
        merged.restore()
    assert_images_match(ours, ref.images)
    assert (ours - before).abs().max() > 0.05


def _lora(model, prefix, names, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names:
        m = model.get_submodule(name)
        out, inp = m.weight.shape[:2]
        key = prefix + name.replace(".", "_")
        sd[key + ".lora_down.weight"] = torch.randn(2, inp, generator=g) * 0.1
        sd[key + ".lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.1
    return sd


def test_refiner_takes_te2_loras_and_ignores_te1(base, refiner):
    refiner = refiner[0]
    tm = refiner.cond.bigg.tower.text_model
    te2 = _lora(tm, "lora_te2_text_model_", ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"])
    deltas = lora_deltas(refiner, te2, "te2.safetensors")
    assert [d.part for d in deltas] == ["te2", "te2"]
    assert {id(d.module) for d in deltas} == {
        id(tm.encoder.layers[0].self_attn.q_proj),
        id(tm.encoder.layers[1].mlp.fc1),
    }
    te1 = _lora(base.cond.clip_l.text_model, "lora_te1_text_model_", ["encoder.layers.0.self_attn.q_proj"])
    with pytest.warns(AdapterWarning, match=r"1 of 3 LoRA layers match no layer of .*lora_te1_text_model_encoder"):
        assert len(lora_deltas(refiner, {**te2, **te1}, "both.safetensors")) == 2
    with pytest.raises(CheckpointError, match="none of its 1 layers .* made for another model family"):
        lora_deltas(refiner, te1, "te1.safetensors")


def test_lora_for_another_family_names_it(base, fixtures_dir, fixture_config, tmp_path):
    from tiny_models import sd1_from_fixture

    sd1 = load_model(str(sd1_from_fixture(fixtures_dir, fixture_config, tmp_path / "sd1.safetensors")))
    # an SD 1.x LoRA (lora_te_ + its UNet names) on SDXL: its text-encoder layers have another width
    sd1_lora = _lora(sd1.cond.text_model, "lora_te_text_model_", ["encoder.layers.0.self_attn.q_proj"])
    sd1_lora |= _lora(sd1.unet, "lora_unet_", ["input_blocks.1.1.proj_in"])
    with pytest.raises(CheckpointError, match=r"x.safetensors: .* made for SD 1.x/2.x, not sdxl-base-tiny"):
        lora_deltas(base, sd1_lora, "x.safetensors")
    # an SDXL UNet-and-CLIP-L LoRA on SD 1.x: shapes differ or nothing matches, and the line names SDXL
    xl = _lora(base.cond.clip_l.text_model, "lora_te1_text_model_", ["encoder.layers.0.mlp.fc1"])
    xl |= _lora(base.unet, "lora_unet_", ["label_emb.0.0", "input_blocks.5.1.transformer_blocks.1.attn1.to_q"])
    with pytest.raises(CheckpointError, match=r"x.safetensors: .* made for SDXL, not sd1"):
        lora_deltas(sd1, xl, "x.safetensors")


# ---------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return tmp_path


ARGS = ("--model", BASE, "--steps", 2, "--dtype", "fp32", "--width", W, "--height", H)


def test_cli_sdxl_lora_option_tag_items_and_metadata(base, components, workdir):
    (workdir / "loras").mkdir()
    style = random_sdxl_lora(components, seed=4)["kohya_original"]
    save_file(style, str(workdir / "loras" / "style.safetensors"))
    detail = random_sdxl_lora(components, seed=5)["peft"]
    save_file(detail, str(workdir / "detail.safetensors"))
    items = [
        {"prompt": "a boat <lora:style:0.5:0.9>", "seed": 3, "out": "o/0.png"},
        {"prompt": "a boat", "seed": 3, "out": "o/1.png"},
    ]
    lora_opt = f"{workdir / 'detail.safetensors'}:0.7"
    r = cli("txt2img", "-", *ARGS, "--lora", lora_opt, "--lora-dir", workdir / "loras", "--json", input=_lines(items))
    assert r.exit_code == 0, r.stderr
    recs = json_lines(r.stdout)
    st = Settings(steps=2, cfg=recs[0]["cfg"])  # SDXL runs at CFG 5 by default
    ds, dd = lora_deltas(base, style, "style"), lora_deltas(base, detail, "detail")
    merged = Merged()

    def ref(pairs):
        merged.set(pairs)
        try:
            return np.asarray(to_pil(pipelines.txt2img(base, ["a boat"], [""], [3], W, H, st)[0]))
        finally:
            merged.restore()

    with_style = ref([(d, 0.7) for d in dd] + [(d, 0.9 if d.part == "unet" else 0.5) for d in ds])
    without = ref([(d, 0.7) for d in dd])
    _close(pixels(recs[0]["path"]), with_style)
    _close(pixels(recs[1]["path"]), without)
    assert np.abs(with_style.astype(int) - without).max() > 10  # the tag's LoRA changes the image
    rec = {x["name"]: x for x in recs[0]["loras"]}
    assert rec["style"]["path"] == str((workdir / "loras" / "style.safetensors").resolve())
    assert (rec["style"]["te"], rec["style"]["unet"], rec["detail"]["te"]) == (0.5, 0.9, 0.7)
    sha = {
        n: hashlib.sha256(p.read_bytes()).hexdigest()
        for n, p in (
            ("style", workdir / "loras" / "style.safetensors"),
            ("detail", workdir / "detail.safetensors"),
        )
    }
    assert rec["style"]["sha256"] == sha["style"] and rec["detail"]["sha256"] == sha["detail"]
    params = read_png_text(recs[0]["path"])["parameters"]
    assert f'Lora hashes: "detail: {sha["detail"][:12]}, style: {sha["style"][:12]}"' in params
    r = cli("txt2img", "--recipe", recs[0]["path"], "--out", "again.png")  # the recorded files and TE/UNet weights
    assert r.exit_code == 0, r.stderr
    assert np.array_equal(pixels("again.png"), pixels(recs[0]["path"]))

    # per item, without --lora: an item after one with a LoRA is bit-identical to a plain run
    items = [
        {"prompt": "a boat", "seed": 3, "out": "p/0.png", "loras": {"style": 1.0}},
        {"prompt": "a boat", "seed": 3, "out": "p/1.png"},
    ]
    r = cli("txt2img", "-", *ARGS, "--lora-dir", workdir / "loras", input=_lines(items))
    assert r.exit_code == 0, r.stderr
    plain = cli("txt2img", "a boat", *ARGS, "--seed", 3, "--out", "plain.png")
    assert plain.exit_code == 0, plain.stderr
    assert np.array_equal(pixels("p/1.png"), pixels("plain.png"))
    assert not np.array_equal(pixels("p/0.png"), pixels("plain.png"))
    _close(pixels("p/0.png"), ref([(d, 1.0) for d in ds]))


def _lines(items):
    return "\n".join(map(json.dumps, items)) + "\n"


def _close(a, b):
    """The CLI's image against the pipeline's on the same merged weights: the CLI's own conv layout may round one
    value in a few thousand to the next level (a plain SDXL run does the same)."""
    d = np.abs(a.astype(int) - b)
    assert d.max() <= 1 and (d == 0).mean() >= 0.999, (d.max(), (d == 0).mean())


def test_cli_sdxl_bad_loras(base, fixtures_dir, fixture_config, workdir):
    from tiny_models import sd1_from_fixture

    def fails(model, lora, match):
        r = cli(
            "txt2img", "a boat", "--model", model, "--steps", 2, "--dtype", "fp32", "--out", "x.png", "--lora", lora
        )
        assert r.exit_code == 2, (r.exit_code, r.stderr)
        assert match in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (workdir / "x.png").exists()

    sd1_path = sd1_from_fixture(fixtures_dir, fixture_config, workdir / "sd1.safetensors")
    sd1 = load_model(str(sd1_path))
    save_file(_lora(sd1.cond.text_model, "lora_te_text_model_", ["encoder.layers.0.mlp.fc1"]), "sd1lora.safetensors")
    fails(BASE, "sd1lora.safetensors", "made for SD 1.x/2.x, not sdxl-base-tiny")
    te2 = _lora(base.cond.bigg.tower.text_model, "lora_te2_text_model_", ["encoder.layers.0.mlp.fc1"])
    save_file(te2, "xl.safetensors")
    fails(sd1_path, "xl.safetensors", "SDXL's second text encoder; this LoRA is for SDXL")
    fails(BASE, "nowhere.safetensors", "--lora nowhere.safetensors: no such file")
