"""A1111 prompts on SDXL (base and refiner): weights, 75-token chunks with comma backtracking, BREAK, emphasis and
textual inversion per encoder, against an independent implementation of A1111's algorithm for the two encoders
(tests/test_prompts.py's parse and chunker on transformers' CLIPTokenizer, diffusers' converted text encoders) fed
to diffusers' SDXL pipelines through prompt_embeds / pooled_prompt_embeds, and against diffusers'
load_textual_inversion on both encoders; plain prompts stay bit-identical; --embedding on the command line.

A1111 references: modules/sd_hijack_clip.py (FrozenCLIPEmbedderForSDXLWithCustomWords: hidden_states[layer_idx],
no final layer norm; forward returns zs[0].pooled), modules/sd_hijack_open_clip.py
(FrozenOpenCLIPEmbedder2WithCustomWords: zero padding, pooled from the encoder), modules/sd_models_xl.py (the zero
uncond for an empty negative).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sdxl_reference import BASE, SDXL_DIR, base_components, tokenizers

from latentgen import pipelines
from latentgen.errors import InputError
from latentgen.images import read_png_text
from latentgen.pipelines import Settings

diffusers = pytest.importorskip("diffusers")
from test_pipelines import _scheduler, assert_images_match  # noqa: E402
from test_prompts import BACKTRACK, LONG, ref_chunks, ref_emphasis  # noqa: E402
from test_sdxl_cli import as_png_pixels, cli, packed, pixels  # noqa: E402
from test_sdxl_pipelines import _pipe  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not BASE.exists(), reason=f"SDXL fixtures not found at {SDXL_DIR}"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]
H, W = 40, 56
TOK_L, TOK_G = tokenizers()


def ref_sdxl(text, text_encoder, text_encoder_2, emphasis="original"):
    """(prompt_embeds [1, n * 77, D_l + D_g], pooled [1, E]) as A1111 makes them: each encoder chunks the text
    (CLIP-L padded with its end token, bigG with 0), takes hidden_states[-2] of each chunk and weights it; the
    pooled output is bigG's of the first chunk, unweighted."""
    chunks_g = ref_chunks(text, TOK_G, 0, emphasis)
    chunks_l = ref_chunks(text, TOK_L, 49407, emphasis) if text_encoder is not None else [None] * len(chunks_g)
    assert len(chunks_l) == len(chunks_g)
    zs, pooled = [], None
    for chunk_l, (ids_g, w) in zip(chunks_l, chunks_g):
        with torch.no_grad():
            out_g = text_encoder_2(torch.tensor([ids_g]), output_hidden_states=True)
            parts = [ref_emphasis(out_g.hidden_states[-2], w, emphasis)]
            if chunk_l is not None:
                ids_l, w_l = chunk_l
                assert w_l == w and ids_l[: ids_l.index(49407)] == ids_g[: ids_g.index(49407)]  # the same chunks
                out_l = text_encoder(torch.tensor([ids_l]), output_hidden_states=True)
                parts.insert(0, ref_emphasis(out_l.hidden_states[-2], w, emphasis))
        pooled = out_g.text_embeds if pooled is None else pooled
        zs.append(torch.cat(parts, dim=-1))
    return torch.hstack(zs), pooled


def _gens(seed):
    return [torch.Generator("cpu").manual_seed(seed)]


WEIGHTED = "a (red:1.3) cube on [a blue] sphere, ((shiny)), (gold:0.6) rim"
CASES = {
    "weighted": (WEIGHTED, "(blurry:1.4), ugly", "original"),
    "long, comma backtrack": (BACKTRACK, ", ".join(["(blurry:1.2)"] * 45), "original"),
    "break": ("a red cube BREAK (a blue sphere:1.2) BREAK gold", "blurry BREAK ugly BREAK dark", "original"),
    "emphasis none": (LONG, "(ugly:1.5), " * 20 + "dark BREAK blurry", "none"),
    "no-norm, empty negative (zeros)": (LONG, "", "no-norm"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_txt2img_matches_diffusers_with_a1111_embeds(base, components, case):
    prompt, negative, emphasis = CASES[case]
    pe, pp = ref_sdxl(prompt, components["text_encoder"], components["text_encoder_2"], emphasis)
    kw = {}
    if negative:
        ne, npool = ref_sdxl(negative, components["text_encoder"], components["text_encoder_2"], emphasis)
        assert ne.shape == pe.shape, case  # diffusers needs equal lengths: the chunk counts match here
        kw = dict(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npool)
    if case.startswith("long"):
        assert pe.shape[1] == 2 * 77
    pipe = _pipe("StableDiffusionXLPipeline", components, "dpmpp_2m", True)
    ref = pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pp,
        **kw,
        height=H,
        width=W,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=_gens(3),
        output_type="np",
    ).images
    st = Settings(steps=4, sampler="dpmpp_2m", karras=True, cfg=5.0, emphasis=emphasis)
    ours = pipelines.txt2img(base, [prompt], [negative], [3], W, H, st)
    assert_images_match(ours, ref)
    literal = base.cond.encode_text([prompt], emphasis="literal")[0]
    assert literal.shape != pe.shape or (literal - pe).abs().max() > 1e-2  # the syntax is read, not taken as text


def test_different_chunk_counts_run_apart(base, components):
    """Prompt of 3 chunks, negative of 1: two UNet calls a step (A1111), each with its own pooled vector in y;
    against a loop over diffusers' UNet, Euler scheduler and VAE."""
    prompt = WEIGHTED + " BREAK " + BACKTRACK
    te, te2 = components["text_encoder"], components["text_encoder_2"]
    (pe, pp), (ne, npool) = ref_sdxl(prompt, te, te2), ref_sdxl("(blurry:1.2)", te, te2)
    assert pe.shape[1] == 3 * 77 and ne.shape[1] == 77
    unet, vae = components["unet"], components["vae"]
    sched = _scheduler("euler", False, "epsilon")
    sched.set_timesteps(4)
    latents = torch.randn((1, 4, H // 8, W // 8), generator=_gens(8)[0]) * sched.init_noise_sigma
    time_ids = torch.tensor([[H, W, 0, 0, H, W]], dtype=torch.float32)
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(latents, t)
            c = unet(inp, t, pe, added_cond_kwargs={"text_embeds": pp, "time_ids": time_ids}).sample
            u = unet(inp, t, ne, added_cond_kwargs={"text_embeds": npool, "time_ids": time_ids}).sample
            latents = sched.step(u + 5.0 * (c - u), t, latents).prev_sample
        ref = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    st = Settings(steps=4, sampler="euler", karras=False, cfg=5.0)
    ours = pipelines.txt2img(base, [prompt], ["(blurry:1.2)"], [8], W, H, st)
    assert_images_match(ours, ref.permute(0, 2, 3, 1).numpy())


def test_refiner_img2img_with_weighted_prompts_matches_diffusers(refiner):
    """The refiner: bigG alone, the negative encoded as the prompt (two chunks each)."""
    bundle, parts = refiner
    prompt, negative = "a (red:1.3) cube, [[matte]] BREAK (gold:0.8)", "(blurry:1.2) BREAK ugly"
    pe, pp = ref_sdxl(prompt, None, parts["text_encoder_2"])
    ne, npool = ref_sdxl(negative, None, parts["text_encoder_2"])
    pipe = _pipe(
        "StableDiffusionXLImg2ImgPipeline",
        parts,
        "euler",
        False,
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    img = torch.rand(1, 3, H, W, generator=torch.Generator().manual_seed(4))
    kw = dict(negative_prompt_embeds=ne, negative_pooled_prompt_embeds=npool)
    ref = pipe(
        prompt_embeds=pe,
        pooled_prompt_embeds=pp,
        **kw,
        image=img,
        strength=0.6,
        num_inference_steps=5,
        guidance_scale=5.0,
        generator=_gens(9),
        output_type="np",
    ).images
    ours = pipelines.img2img(bundle, img, [prompt], [negative], [9], Settings(steps=5, sampler="euler", cfg=5.0))
    assert_images_match(ours, ref)


def test_plain_prompts_are_the_old_encoding_bit_for_bit_and_diffusers(base, components):
    """Plain prompts (no syntax, <= 75 tokens): the chunked path is today's single tokenize + encode exactly, and
    diffusers' encode_prompt within 1e-5."""
    cond = base.cond
    prompts = ["a red cube on top of a blue sphere", "", "an oil painting, of a lighthouse at night"]
    context, pooled = cond.encode_text(prompts)
    with torch.no_grad():
        hidden_g, old_pooled = cond.encode_g(cond.tokenize_g(prompts))
        old = torch.cat([cond.encode_l(cond.tokenize_l(prompts)), hidden_g], dim=-1)
    assert torch.equal(context, old) and torch.equal(pooled, old_pooled)
    pipe = _pipe("StableDiffusionXLPipeline", components, "euler", False)
    pe, _, pp, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    assert (context - pe).abs().max().item() < 1e-5 and (pooled - pp).abs().max().item() < 1e-5


def test_a_batch_pads_shorter_prompts_with_empty_chunks(base, components):
    """A1111 pads a batch's shorter prompts with the empty chunk; each prompt pools its own first chunk."""
    te, te2 = components["text_encoder"], components["text_encoder_2"]
    context, pooled = base.cond.encode_text([BACKTRACK, WEIGHTED])
    (long_pe, long_pp), (short_pe, short_pp), (empty_pe, _) = (ref_sdxl(t, te, te2) for t in (BACKTRACK, WEIGHTED, ""))
    want = torch.cat([long_pe, torch.cat([short_pe, empty_pe], dim=1)])
    assert context.shape == want.shape and (context - want).abs().max().item() < 1e-5
    assert (pooled - torch.cat([long_pp, short_pp])).abs().max().item() < 1e-5
    with pytest.raises(InputError, match="embedding mystyle has no clip_l vectors"):
        base.cond.encode_text(["a mystyle"], embeddings={"mystyle": {"clip_g": torch.zeros(1, 128)}})


# ---------------------------------------------------------------------------------------- textual inversion


def _sdxl_embedding(path, n=2, seed=5):
    g = torch.Generator().manual_seed(seed)
    vectors = {"clip_l": torch.randn(n, 64, generator=g) * 0.5, "clip_g": torch.randn(n, 128, generator=g) * 0.5}
    save_file(vectors, str(path))
    return vectors


def test_textual_inversion_matches_diffusers_on_both_encoders(base, tmp_path):
    """diffusers' load_textual_inversion twice (clip_l into text_encoder / tokenizer, clip_g into text_encoder_2 /
    tokenizer_2); bigG pools at its first end token (A1111 argmax over ids holding 0 at the vectors)."""
    from latentgen.adapters.embeddings import load_sdxl_embeddings

    vectors = _sdxl_embedding(tmp_path / "mystyle.safetensors")
    parts = base_components()  # fresh: load_textual_inversion grows the encoders' token tables
    parts["text_encoder_2"].text_model.eos_token_id = 49407  # the pooled token: the end token, not argmax
    pipe = _pipe("StableDiffusionXLPipeline", parts, "euler", False)
    pipe.load_textual_inversion(
        vectors["clip_l"], token="mystyle", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        vectors["clip_g"], token="mystyle", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    prompt, negative = "a photo of mystyle by the sea", "blurry mystyle"
    ref = pipe(
        prompt,
        negative_prompt=negative,
        height=H,
        width=W,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=_gens(6),
        output_type="np",
    ).images
    loaded = load_sdxl_embeddings([tmp_path], {"clip_l": 64, "clip_g": 128})
    st = Settings(steps=4, sampler="euler", karras=False, cfg=5.0, embeddings={k: v for k, (v, _) in loaded.items()})
    ours = pipelines.txt2img(base, [prompt], [negative], [6], W, H, st)
    assert_images_match(ours, ref)
    without = pipelines.txt2img(base, [prompt], [negative], [6], W, H, Settings(steps=4, sampler="euler", cfg=5.0))
    assert (ours - without).abs().max() > 1e-2  # the vectors are used


def test_cli_embedding_on_sdxl_and_an_sd1_embedding_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    vectors = _sdxl_embedding(tmp_path / "mystyle.safetensors", n=3, seed=8)
    common = ["--model", BASE, "--dtype", "fp32", "--steps", 3, "--width", W, "--height", H, "--no-karras"]
    prompt = "a (mystyle:1.2) cube"
    r = cli("txt2img", prompt, *common, "--seed", 4, "--embedding", tmp_path / "mystyle.safetensors", "--out", "a.png")
    assert r.exit_code == 0, r.stderr
    st = Settings(steps=3, karras=False, cfg=5.0, embeddings={"mystyle": vectors})
    want = pipelines.txt2img(packed(str(BASE)), [prompt], [""], [4], W, H, st)[0]
    assert np.array_equal(pixels("a.png"), as_png_pixels(want))
    assert 'TI hashes: "mystyle: ' in read_png_text("a.png")["parameters"]
    r = cli("txt2img", "--recipe", "a.png", "--out", "b.png")
    assert r.exit_code == 0 and np.array_equal(pixels("a.png"), pixels("b.png")), r.stderr
    r = cli("txt2img", prompt, *common, "--seed", 4, "--clip-skip", 2, "--out", "c.png")
    assert r.exit_code == 0 and "SDXL already uses the penultimate layer" in r.stderr, r.stderr
    assert "Clip skip: 2" in read_png_text("c.png")["parameters"]
    save_file({"emb_params": torch.zeros(2, 64)}, str(tmp_path / "sd1.safetensors"))  # CLIP-L's width, no clip_g
    r = cli("txt2img", "a sd1 cube", *common, "--embedding", tmp_path / "sd1.safetensors", "--out", "x.png")
    assert r.exit_code == 2, (r.exit_code, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not an SDXL embedding" in lines[0], r.stderr
    assert not (tmp_path / "x.png").exists()
