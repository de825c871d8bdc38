"""A1111's prompt syntax and prompt editing on the BERT-conditioned CompVis LDM (the ldm-kl-bert fixture) and the
shipped default model, against an independent implementation written here: transformers' Python BertTokenizer on the
shipped vocabulary, test_prompts' hand-written parse / chunking / emphasis, the BERT encoder called chunk by chunk,
and sampling loops over diffusers' schedulers and the UNet.
"""

from importlib import resources

import numpy as np
import pytest
import torch
from test_cli import cli, pixels
from test_pipelines import _scheduler, assert_images_match
from test_prompts import BACKTRACK, LONG, ref_chunks, ref_emphasis

from latentgen import pipelines
from latentgen.images import read_png_text
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings
from latentgen.text import prompts as prompts_mod
from latentgen.text.prompts import encode_bert_prompts

transformers = pytest.importorskip("transformers")

SYNTAX = "a (red:1.4) circle, [small] (blue square) above a ((green)) ring"


@pytest.fixture(scope="module")
def bert(fixtures_dir, fixture_config):
    return load_model(str(fixtures_dir / "ldm-kl-bert-tiny.safetensors"), config=fixture_config("ldm-kl-bert-tiny"))


@pytest.fixture(scope="module")
def default():
    return load_model("builtin:default-txt2img")  # float32


@pytest.fixture(scope="module")
def tok():
    """The pure-Python BERT tokenizer (ours is built on the `tokenizers` library)."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab = resources.files("latentgen").joinpath("assets", "bert_vocab.txt")
    return BertTokenizerLegacy(vocab_file=str(vocab), do_lower_case=True)


def ref_encode(text, bundle, tok, emphasis="original"):
    """Chunks of max_seq_len - 2 WordPiece tokens, [CLS] ... [SEP] [PAD]..., each through the BERT transformer on
    its own, the emphasis per chunk, the chunks side by side."""
    size = bundle.cond.cfg.max_seq_len - 2
    specials = (tok.cls_token_id, tok.sep_token_id, tok.convert_tokens_to_ids(","))
    zs = []
    for ids, w in ref_chunks(text, tok, tok.pad_token_id, emphasis, size, specials):
        with torch.no_grad():
            zs.append(ref_emphasis(bundle.cond.transformer(torch.tensor([ids])), w, emphasis))
    return torch.hstack(zs)


def old_encoder(embedder, texts, emphasis="original"):
    """The BERT conditioning before the prompt syntax: every prompt read literally (and truncated)."""
    return embedder.encode(list(texts))


@pytest.mark.parametrize(
    "text,emphasis",
    [
        (SYNTAX, "original"),
        (SYNTAX, "no-norm"),
        (SYNTAX, "none"),
        (SYNTAX, "literal"),
        (LONG, "original"),
        (BACKTRACK, "original"),
        ("(zero:0) and (negative:-0.5) BREAK BREAK", "original"),
    ],
)
def test_context_matches_reference(bert, tok, text, emphasis):
    ref = ref_encode(text, bert, tok, emphasis)
    ours = encode_bert_prompts(bert.cond, [text], emphasis=emphasis)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < 1e-6, err


def test_default_model_chunks_its_24_token_context(default, tok):
    text = "a large (red:1.3) circle above a small blue square on a gray background, " * 2 + "BREAK a ring"
    ref = ref_encode(text, default, tok)
    assert ref.shape[1] == 3 * 24 and default.cond.cfg.max_seq_len == 24
    err = (encode_bert_prompts(default.cond, [text]) - ref).abs().max().item()
    assert err < 1e-6, err


@pytest.mark.parametrize("model", ["bert", "default"])
def test_plain_prompts_are_bit_identical_to_the_literal_encoder(request, model):
    cond = request.getfixturevalue(model).cond
    texts = ["a large red circle above a small blue square on a gray background", "", "a ring, a square"]
    assert torch.equal(encode_bert_prompts(cond, texts), cond.encode(texts))


def _euler_loop(bundle, contexts_at, uncond, steps, seed, cfg, size=32):
    """diffusers' Euler scheduler (leading spacing) over the UNet with the context of each model call."""
    sched = _scheduler("euler", False, {"eps": "epsilon", "v": "v_prediction"}[bundle.config.prediction])
    sched.set_timesteps(steps)
    f = size // bundle.config.factor
    g = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, bundle.config.latent_channels, f, f), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for call, t in enumerate(sched.timesteps):
            inp = sched.scale_model_input(latents, t)
            c = bundle.unet(inp, t[None], context=contexts_at(call))
            u = bundle.unet(inp, t[None], context=uncond)
            latents = sched.step(u + cfg * (c - u), t, latents).prev_sample
        img = bundle.first_stage.decode_latent(latents / bundle.config.scale_factor)
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def test_txt2img_with_syntax_matches_the_reference(bert, tok):
    neg = "(blurry:1.3), ugly BREAK low quality"  # two chunks: the guidance branches run apart
    pe, ne = ref_encode(LONG, bert, tok), ref_encode(neg, bert, tok)
    ref = _euler_loop(bert, lambda call: pe, ne, 5, 11, 6.0)
    st = Settings(steps=5, sampler="euler", karras=False, cfg=6.0)
    ours = pipelines.txt2img(bert, [LONG], [neg], [11], 32, 32, st)
    assert_images_match(ours, ref)


def test_prompt_editing_swaps_the_context_at_the_scheduled_call(bert, tok):
    """A1111's CFGDenoiser: model call k (from 0) takes the text of step max(k, 1) (the first schedule entry with
    k <= until). ``[(circle:1.5):square:2]``: "(circle:1.5)" until step 2, so Euler's calls 0-2, then "square";
    ``[red|blue]``: red at odd steps, blue at even ones."""
    prompt = "a [red|blue] [(circle:1.5):square:2] above a ring"
    shapes, colours = ("(circle:1.5)", "square"), ("red", "blue")
    ctx = {(s, c): ref_encode(f"a {c} {s} above a ring", bert, tok) for s in shapes for c in colours}
    ne = ref_encode("", bert, tok)
    right = lambda call: ctx[shapes[max(call, 1) > 2], colours[(max(call, 1) - 1) % 2]]  # noqa: E731
    ref = _euler_loop(bert, right, ne, 6, 5, 9.0)
    st = Settings(steps=6, sampler="euler", karras=False, cfg=9.0)
    ours = pipelines.txt2img(bert, [prompt], [""], [5], 32, 32, st)
    assert_images_match(ours, ref)
    off_by_one = lambda call: ctx[shapes[call > 2], colours[call % 2]]  # noqa: E731
    for other in (off_by_one, lambda call: ctx[shapes[1], "blue"]):  # the test tells the swap's call apart
        with pytest.raises(AssertionError, match="share within 1 level"):
            assert_images_match(ours, _euler_loop(bert, other, ne, 6, 5, 9.0))


@pytest.mark.parametrize("model", ["bert", "default"])
def test_plain_image_is_todays(request, model, monkeypatch):
    bundle = request.getfixturevalue(model)
    st = Settings(steps=3, sampler="euler", karras=False, cfg=4.0)
    args = (["a large red circle above a small blue square"], [""], [7], 32, 32, st)
    ours = pipelines.txt2img(bundle, *args)
    monkeypatch.setattr(prompts_mod, "encode_bert_prompts", old_encoder)
    assert torch.equal(ours, pipelines.txt2img(bundle, *args))


def test_cli_default_model_reads_the_syntax(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ("--steps", 3, "--dtype", "fp32", "--seed", 3, "--width", 32, "--height", 32)
    prompt = "a (red:1.4) circle"
    for args, out in [((), "w.png"), (("--emphasis", "literal"), "l.png"), (("--clip-skip", 2), "s.png")]:
        r = cli("txt2img", prompt, *base, *args, "--out", out)
        assert r.exit_code == 0, r.stderr
    assert read_png_text("w.png")["parameters"].startswith(prompt + "\n")
    assert not np.array_equal(pixels("w.png"), pixels("l.png"))
    assert np.array_equal(pixels("w.png"), pixels("s.png")) and "--clip-skip" in r.stderr
    monkeypatch.setattr(prompts_mod, "encode_bert_prompts", old_encoder)
    assert cli("txt2img", prompt, *base, "--out", "old.png").exit_code == 0
    assert np.array_equal(pixels("l.png"), pixels("old.png"))  # --emphasis literal: today's image


def test_cli_bad_prompt_input_on_bert(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = cli("txt2img", "a (red:1.2.3) circle", "--steps", 1, "--out", "x.png")  # a failed item, as on CLIP models
    assert r.exit_code == 1 and "prompt weight ':1.2.3'" in r.stderr and "Traceback" not in r.stderr
    r = cli("txt2img", "a circle", "--emphasis", "loud", "--steps", 1, "--out", "y.png")
    assert r.exit_code == 2 and "--emphasis 'loud' is unknown" in r.stderr and "Traceback" not in r.stderr
    from safetensors.torch import save_file

    save_file({"emb_params": torch.zeros(2, 128)}, str(tmp_path / "tok.safetensors"))
    r = cli("txt2img", "a tok", "--embedding", tmp_path / "tok.safetensors", "--steps", 1, "--out", "z.png")
    assert r.exit_code == 2 and "--embedding needs a CLIP text encoder" in r.stderr, r.stderr
    assert not list(tmp_path.glob("*.png"))
