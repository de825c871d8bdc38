"""LoRA / LyCORIS deltas: kohya and PEFT files of the same random delta against diffusers' load_lora_weights +
fuse_lora (images within 1 level on 99.9% of 8-bit values), LoHa / LoKr / LoCon-mid / full diff against their
published formulas written here, exact restore, bad files."""

import pytest
import torch
from safetensors.torch import save_file

from latentgen import pipelines
from latentgen.adapters.lora import AdapterWarning, Merged, compute_delta, diffusers_unet_name, lora_deltas
from latentgen.errors import CheckpointError
from latentgen.pipelines import Settings

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from test_pipelines import _sd_pipeline, assert_images_match  # noqa: E402

RANK = 4


def _targets(model, kinds):
    names = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2", "conv1")
    names += ("q_proj", "v_proj", "out_proj", "fc1")
    for name, m in model.named_modules():
        if isinstance(m, kinds) and name.endswith(names):
            yield name, m


def random_lora(unet, text, seed=0, alpha=2.0):
    """kohya keys (diffusers UNet names, conv LoCon on the ResBlocks) and the PEFT keys of the same delta
    (alpha/rank folded into lora_B)."""
    g = torch.Generator().manual_seed(seed)
    kohya, peft = {}, {}
    for prefix, peft_prefix, model in (("lora_unet_", "unet.", unet), ("lora_te_", "text_encoder.", text)):
        for name, m in _targets(model, (torch.nn.Linear, torch.nn.Conv2d)):
            w = m.weight
            tail = w.shape[2:]
            down = torch.randn(RANK, w.shape[1], *tail, generator=g) * 0.3 / w.shape[1] ** 0.5
            up = torch.randn(w.shape[0], RANK, *[1] * len(tail), generator=g) * 0.3
            flat = name if prefix == "lora_unet_" or name.startswith("text_model") else "text_model." + name
            key = prefix + flat.replace(".", "_")
            kohya[key + ".lora_down.weight"], kohya[key + ".lora_up.weight"] = down, up
            kohya[key + ".alpha"] = torch.tensor(alpha)
            peft[f"{peft_prefix}{flat}.lora_A.weight"] = down
            peft[f"{peft_prefix}{flat}.lora_B.weight"] = up * (alpha / RANK)
    return kohya, peft


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_lora_matches_diffusers_fuse_lora(request, tmp_path, family, fmt):
    pack = request.getfixturevalue(family)
    bundle, unet, _, text, _ = pack
    files = dict(zip(("kohya", "peft"), random_lora(unet, text, seed=1)))
    path = tmp_path / f"{fmt}.safetensors"
    save_file(files[fmt], str(path))
    pipe = _sd_pipeline("txt2img", pack, "euler", False)
    st = Settings(steps=4, sampler="euler", karras=False, cfg=5.0)
    before = pipelines.txt2img(bundle, ["a lighthouse"], [""], [5], 16, 16, st)

    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(lora_scale=0.8)
    ref = pipe(
        ["a lighthouse"],
        height=16,
        width=16,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=[torch.Generator("cpu").manual_seed(5)],
        output_type="np",
    ).images
    pipe.unfuse_lora()
    pipe.unload_lora_weights()

    deltas = lora_deltas(bundle, files[fmt], str(path))
    assert {d.part for d in deltas} == {"unet", "te"}
    merged = Merged()
    merged.set([(d, 0.8) for d in deltas])
    try:
        ours = pipelines.txt2img(bundle, ["a lighthouse"], [""], [5], 16, 16, st)
    finally:
        merged.restore()
    assert_images_match(ours, ref)
    assert (ours - before).abs().max() > 0.05  # the LoRA changes the image
    assert torch.equal(pipelines.txt2img(bundle, ["a lighthouse"], [""], [5], 16, 16, st), before)


def test_kohya_original_names_equal_diffusers_names(sd1):
    bundle, unet, _, text, _ = sd1
    kohya, _ = random_lora(unet, text, seed=2)
    ours = {}
    for name, _m in bundle.unet.named_modules():
        dn = diffusers_unet_name(name, bundle.unet)
        if dn is not None:
            ours[dn.replace(".", "_")] = name.replace(".", "_")
    renamed = {}
    for key, v in kohya.items():
        path, role = key.split(".", 1)
        if path.startswith("lora_unet_"):
            path = "lora_unet_" + ours[path[len("lora_unet_") :]]
        renamed[f"{path}.{role}"] = v
    a = {id(d.module): d.value() for d in lora_deltas(bundle, kohya, "k")}
    b = {id(d.module): d.value() for d in lora_deltas(bundle, renamed, "o")}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------- LyCORIS


def _rand(g, *shape):
    return torch.randn(*shape, generator=g)


def test_loha_lokr_locon_diff_formulas():
    """Published formulas, written independently: LoHa (FedPara) ΔW = (w1a w1b) ∘ (w2a w2b) · α/r; LoKr ΔW = w1 ⊗ w2
    (α/r only when a factor is low rank); Tucker factors Σ_ij t_ij·a_i·b_j; LoCon with lora_mid."""
    g = torch.Generator().manual_seed(0)
    out, inp, r = 6, 8, 2
    a1, b1, a2, b2 = _rand(g, out, r), _rand(g, r, inp), _rand(g, out, r), _rand(g, r, inp)
    roles = {"hada_w1_a": a1, "hada_w1_b": b1, "hada_w2_a": a2, "hada_w2_b": b2, "alpha": torch.tensor(1.0)}
    want = torch.zeros(out, inp)
    for i in range(out):
        for j in range(inp):
            want[i, j] = (a1[i] * b1[:, j]).sum() * (a2[i] * b2[:, j]).sum() * 0.5
    assert torch.allclose(compute_delta(roles, torch.Size([out, inp])), want, atol=1e-5)

    # LoHa with Tucker cores on a 3x3 conv: factor[p, q, k, l] = Σ_ij t[i, j, k, l] a[i, p] b[j, q]
    t1, t2 = _rand(g, r, r, 3, 3), _rand(g, r, r, 3, 3)
    ta1, tb1, ta2, tb2 = _rand(g, r, out), _rand(g, r, inp), _rand(g, r, out), _rand(g, r, inp)
    roles = {"hada_w1_a": ta1, "hada_w1_b": tb1, "hada_w2_a": ta2, "hada_w2_b": tb2, "hada_t1": t1, "hada_t2": t2}

    def tucker(t, a, b):
        f = torch.zeros(a.shape[1], b.shape[1], *t.shape[2:])
        for i in range(t.shape[0]):
            for j in range(t.shape[1]):
                f += t[i, j] * (a[i][:, None] * b[j][None, :])[..., None, None]
        return f

    want = tucker(t1, ta1, tb1) * tucker(t2, ta2, tb2)  # no alpha: scale 1
    assert torch.allclose(compute_delta(roles, torch.Size([out, inp, 3, 3])), want, atol=1e-4)

    # LoKr: both factors whole → alpha ignored; w2 low rank → alpha / rank(w2_b)
    w1, w2 = _rand(g, 2, 2), _rand(g, 3, 4)
    kron = torch.stack([torch.cat([w1[i, j] * w2 for j in range(2)], 1) for i in range(2)]).reshape(6, 8)
    roles = {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(8.0)}
    assert torch.allclose(compute_delta(roles, torch.Size([6, 8])), kron, atol=1e-5)
    w2a, w2b = _rand(g, 3, 1), _rand(g, 1, 4)
    roles = {"lokr_w1": w1, "lokr_w2_a": w2a, "lokr_w2_b": w2b, "alpha": torch.tensor(0.5)}
    low = torch.stack([torch.cat([w1[i, j] * (w2a @ w2b) for j in range(2)], 1) for i in range(2)]).reshape(6, 8)
    assert torch.allclose(compute_delta(roles, torch.Size([6, 8])), low * 0.5, atol=1e-5)

    # LoCon with a CP mid: ΔW[o, c, k, l] = Σ_ij up[o, i] mid[i, j, k, l] down[j, c] · α/r
    up, mid, down = _rand(g, out, r, 1, 1), _rand(g, r, r, 3, 3), _rand(g, r, inp, 1, 1)
    roles = {"lora_up.weight": up, "lora_mid.weight": mid, "lora_down.weight": down, "alpha": torch.tensor(1.0)}
    want = tucker(mid, up[:, :, 0, 0].T, down[:, :, 0, 0]) * 0.5
    assert torch.allclose(compute_delta(roles, torch.Size([out, inp, 3, 3])), want, atol=1e-4)

    d = _rand(g, out, inp)
    assert torch.equal(compute_delta({"diff": d}, torch.Size([out, inp])), d)


def test_lycoris_file_merges_and_restores_exactly(sd1):
    """A LoHa + LoKr + diff file on the UNet and the text encoder: weights change by the formula, and restoring
    (also after a packed conv was used) gives the base weights bit for bit."""
    from latentgen.loading.weights import prepack

    bundle = sd1[0]
    g = torch.Generator().manual_seed(4)
    q = bundle.unet.input_blocks[1][1].transformer_blocks[0].attn1.to_q
    conv = bundle.unet.input_blocks[1][0].in_layers[2]
    te = bundle.cond.text_model.encoder.layers[0].mlp.fc1
    sd = {
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.hada_w1_a": _rand(g, q.weight.shape[0], 2),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.hada_w1_b": _rand(g, 2, q.weight.shape[1]) * 0.1,
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.hada_w2_a": _rand(g, q.weight.shape[0], 2),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.hada_w2_b": _rand(g, 2, q.weight.shape[1]) * 0.1,
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w1": _rand(g, 2, 2) * 0.1,
        "lora_unet_down_blocks_0_resnets_0_conv1.lokr_w2": _rand(
            g, conv.weight.shape[0] // 2, conv.weight.shape[1] // 2, 3, 3
        ),
        "lora_te_text_model_encoder_layers_0_mlp_fc1.diff": _rand(g, *te.weight.shape) * 0.01,
        "lora_te_text_model_encoder_layers_0_mlp_fc1.diff_b": _rand(g, *te.bias.shape) * 0.01,
    }
    base = {k: v.clone() for k, v in [("q", q.weight), ("conv", conv.weight), ("te", te.weight), ("b", te.bias)]}
    st = Settings(steps=2, sampler="euler", karras=False, cfg=3.0)
    prepack(bundle.unet)
    try:
        before = pipelines.txt2img(bundle, ["x"], [""], [1], 16, 16, st)
        merged = Merged()
        merged.set([(d, 1.0) for d in lora_deltas(bundle, sd, "lyco")])
        loha = (sd[next(k for k in sd if k.endswith("w1_a"))] @ sd[next(k for k in sd if k.endswith("w1_b"))]) * (
            sd[next(k for k in sd if k.endswith("w2_a"))] @ sd[next(k for k in sd if k.endswith("w2_b"))]
        )
        assert torch.allclose(q.weight - base["q"], loha, atol=1e-5)
        assert torch.allclose(te.bias - base["b"], sd["lora_te_text_model_encoder_layers_0_mlp_fc1.diff_b"], atol=1e-6)
        changed = pipelines.txt2img(bundle, ["x"], [""], [1], 16, 16, st)
        assert not torch.equal(changed, before)
        merged.restore()
        for k, m in (("q", q.weight), ("conv", conv.weight), ("te", te.weight), ("b", te.bias)):
            assert torch.equal(m, base[k]), k
        assert torch.equal(pipelines.txt2img(bundle, ["x"], [""], [1], 16, 16, st), before)
    finally:
        for m in bundle.unet.modules():
            if type(m).__name__ in ("PackedConv2d", "PackedLinear"):
                w = m.weight.detach().clone()
                m.__class__ = type(m).__mro__[2]
                m._parameters["weight"] = torch.nn.Parameter(w, requires_grad=False)
                m.__dict__.pop("packed", None)


def test_bad_lora_files(sd1, sd2):
    bundle = sd1[0]
    with pytest.raises(CheckpointError, match="no LoRA/LyCORIS weights"):
        lora_deltas(bundle, {"foo.weight": torch.zeros(2)}, "x.safetensors")
    wrong = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 1024),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(1024, 4),
    }
    with pytest.raises(CheckpointError, match=r"x.safetensors: lora_te_.*q_proj has shape \[1024, 1024\].*another"):
        lora_deltas(bundle, wrong, "x.safetensors")
    sdxl = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 8)}
    with pytest.raises(CheckpointError, match="SDXL's second text encoder"):
        lora_deltas(bundle, sdxl, "x.safetensors")
    nothing = {
        "lora_unet_nowhere_0.lora_down.weight": torch.zeros(1, 1),
        "lora_unet_nowhere_0.lora_up.weight": torch.zeros(1, 1),
    }
    with pytest.raises(CheckpointError, match="none of its 1 layers"):
        lora_deltas(bundle, nothing, "x.safetensors")
    half = dict(nothing)
    half["lora_te_text_model_encoder_layers_0_mlp_fc2.diff"] = torch.zeros_like(
        bundle.cond.text_model.encoder.layers[0].mlp.fc2.weight
    )
    with pytest.warns(AdapterWarning, match=r"1 of 2 LoRA layers match no layer .* \(e.g. lora_unet_nowhere_0\)"):
        assert len(lora_deltas(bundle, half, "x.safetensors")) == 1


def test_merge_into_weights_upcast_on_use_restores_exactly():
    """Low-memory models keep fp16 weights behind an upcast parametrization: the merge lands in the stored tensor
    (rounded to fp16, as A1111 merges into fp16 weights) and restoring gives the stored tensor back bit for bit."""
    from latentgen.adapters.lora import Delta
    from latentgen.loading.weights import upcast_on_use

    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(8, 6).half().requires_grad_(False)
    upcast_on_use(lin, torch.float32)
    stored = lin.parametrizations.weight.original
    base = lin.weight.clone()
    delta = torch.randn(6, 8, generator=g) * 0.1
    merged = Merged()
    merged.set([(Delta(lin, "weight", delta, "unet"), 0.5)])
    assert lin.weight.dtype == torch.float32 and lin.parametrizations.weight.original.dtype == torch.float16
    assert torch.allclose(lin.weight, base + 0.5 * delta, atol=2e-3)
    merged.restore()
    assert lin.parametrizations.weight.original is stored and torch.equal(lin.weight, base)
