"""A1111 prompt syntax, chunking, emphasis and clip skip against an independent implementation of A1111's algorithm
written here (transformers' CLIPTokenizer and CLIPTextModel, fed to diffusers through ``prompt_embeds``), plus
hand-worked parses of tricky strings.

A1111 references: modules/prompt_parser.py (parse_prompt_attention and its doctest examples), modules/sd_hijack_clip.py
(tokenize_line, process_tokens, encode_with_transformers), modules/sd_emphasis.py.
"""

import re

import pytest
import torch

from latentgen import pipelines
from latentgen.errors import ConfigError, InputError
from latentgen.pipelines import Settings
from latentgen.text.prompts import clip_vocabulary, encode_prompts, make_chunks, parse_attention

diffusers = pytest.importorskip("diffusers")
from test_pipelines import _scheduler, _sd_pipeline, _tokenizer, assert_images_match  # noqa: E402

LONG = ", ".join(["a photo of a (red:1.2) cat"] * 9) + ", [[blue]] sky BREAK (a lighthouse:0.7) at (night)"
NEG_LONG = ", ".join(["blurry"] * 50) + ", (ugly:1.4) BREAK low quality"
BACKTRACK = ", ".join(["a photo of a (cat:1.3)"] * 14)  # the 13th segment crosses token 75: it moves on


# ------------------------------------------------------------------------------------------- hand-worked


@pytest.mark.parametrize(
    "text,want",
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        (r"\(literal\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.3 * 1.1 * 1.1),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.1 * 1.1 * 1.1 * 1.1),
                (".", 1.1),
            ],
        ),
        ("(word:0)", [("word", 0.0)]),
        ("x (word:-1.5) y", [("x ", 1.0), ("word", -1.5), (" y", 1.0)]),
        ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
        ("(a:1.2", [("a:1.2", 1.1)]),  # the weight needs its ')'; the '(' closes at the end
        ("a) b] :1.5)", [("a) b] :1.5)", 1.0)]),  # closers without openers are text
        ("(a [b) c]", [("a ", 1.1), ("b", 1.1 / 1.1), (" c", 1 / 1.1)]),  # interleaved brackets
        (r"a \\ b \c", [("a \\ b c", 1.0)]),  # escaped backslash kept, a lone one dropped
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("aBREAK b, break", [("aBREAK b, break", 1.0)]),  # only the upper-case word
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),  # inside brackets BREAK is text
        ("", [("", 1.0)]),
    ],
)
def test_parse_attention_hand_worked(text, want):
    got = parse_attention(text)
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [w for _, w in got] == pytest.approx([w for _, w in want], rel=1e-12)


def test_parse_attention_bad_weight():
    with pytest.raises(InputError, match=r"prompt weight ':1\.2\.3' .* is not a number"):
        parse_attention("(a:1.2.3)")


def test_chunks_break_backtrack_and_padding():
    voc = clip_vocabulary(49407)
    text = ", ".join(["a photo of a cat"] * 13)  # 6 tokens a segment with its comma: the 13th crosses 75
    (first, second) = make_chunks(parse_attention(text), voc)
    assert len(first.ids) == len(second.ids) == 77 and first.ids[0] == 49406
    comma = voc.comma
    # the first chunk ends right after the 12th comma (position 72 of 75), the rest of the text moved on
    assert first.ids[72] == comma and first.ids[73:] == [49407] * 4
    assert second.ids[1:6] == voc.tokenize("a photo of a cat")
    sd2 = make_chunks(parse_attention("a cat BREAK a dog"), clip_vocabulary(0))
    assert len(sd2) == 2 and sd2[0].ids[:5] == [49406, *voc.tokenize("a cat"), 49407, 0]
    assert make_chunks(parse_attention("BREAK x"), voc)[0].ids == [49406] + [49407] * 76


# ------------------------------------------------------------------------ the independent A1111 reference


def ref_parse(text):
    """A1111's attention parse, written as a character scanner."""
    res, rounds, squares, run = [], [], [], []

    def flush():
        if run:
            for k, part in enumerate(re.split(r"\s*\bBREAK\b\s*", "".join(run))):
                if k:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
            run.clear()

    def mul(start, f):
        for r in res[start:]:
            r[1] *= f

    i = 0
    while i < len(text):
        c = text[i]
        if c not in "\\()[]:":
            run.append(c)
            i += 1
            continue
        flush()
        if c == "\\":
            nxt = text[i + 1 : i + 2]
            escaped = nxt != "" and nxt in "()[]\\"
            res.append([nxt if escaped else "", 1.0])
            i += 2 if escaped else 1
        elif c in "([":
            (rounds if c == "(" else squares).append(len(res))
            i += 1
        elif c == ":":
            m = re.match(r":\s*([+-]?[.\d]+)\s*\)", text[i:])
            if m and rounds:
                mul(rounds.pop(), float(m.group(1)))
            else:  # a weight with no bracket open is text, as a lone colon
                res.append([m.group(0) if m else ":", 1.0])
            i += m.end() if m else 1
        else:
            stack = rounds if c == ")" else squares
            if stack:
                mul(stack.pop(), 1.1 if c == ")" else 1 / 1.1)
            else:
                res.append([c, 1.0])
            i += 1
    flush()
    for s in rounds:
        mul(s, 1.1)
    for s in squares:
        mul(s, 1 / 1.1)
    out = []
    for t, w in res:
        if out and out[-1][1] == w:
            out[-1][0] += t
        else:
            out.append([t, w])
    return out or [["", 1.0]]


def ref_chunks(text, tok, pad, emphasis="original", size=75, specials=None):
    """A1111 tokenize_line: 75-token chunks, comma backtrack of 20, BREAK; SD 2 pads after the first EOS.
    ``size``: tokens a chunk holds (CLIP 75); ``specials``: (bos, eos, comma) of a tokenizer that is not CLIP's."""
    parsed = [[text, 1.0]] if emphasis == "literal" else ref_parse(text)
    ids_of = tok([t for t, _ in parsed], add_special_tokens=False)["input_ids"]
    bos, eos, comma = specials or (tok.bos_token_id, tok.eos_token_id, tok.get_vocab()[",</w>"])
    chunks, cur, last_comma = [], [[], []], [-1]

    def nxt():
        n = size - len(cur[0])
        ids = [bos] + cur[0] + [eos] * n + [eos]
        if pad != eos:
            first = ids.index(eos)
            ids = ids[: first + 1] + [pad] * (size + 1 - first)
        chunks.append((ids, [1.0] + cur[1] + [1.0] * (n + 1)))
        cur[0], cur[1], last_comma[0] = [], [], -1

    for ids, (t, w) in zip(ids_of, parsed):
        if t == "BREAK" and w == -1:
            nxt()
            continue
        for token in ids:
            if token == comma:
                last_comma[0] = len(cur[0])
            elif len(cur[0]) == size and last_comma[0] != -1 and size - last_comma[0] <= 20:
                cut = last_comma[0] + 1
                moved = (cur[0][cut:], cur[1][cut:])
                cur[0], cur[1] = cur[0][:cut], cur[1][:cut]
                nxt()
                cur[0], cur[1] = list(moved[0]), list(moved[1])
            if len(cur[0]) == size:
                nxt()
            cur[0].append(token)
            cur[1].append(w)
    if cur[0] or not chunks:
        nxt()
    return chunks


def ref_encode(text, text_model, tok, pad, clip_skip=1, emphasis="original", sd2=False):
    """A1111 process_tokens on transformers' CLIPTextModel: hidden state -N + final layer norm, emphasis per
    chunk, chunks stacked along the sequence."""
    zs = []
    inner = getattr(text_model, "text_model", text_model)
    for ids, w in ref_chunks(text, tok, pad, emphasis):
        with torch.no_grad():
            out = text_model(torch.tensor([ids]), output_hidden_states=True)
            if clip_skip > 1 and not sd2:
                z = inner.final_layer_norm(out.hidden_states[-clip_skip])
            else:
                z = out.last_hidden_state
        zs.append(ref_emphasis(z, w, emphasis))
    return torch.hstack(zs)


def ref_emphasis(z, w, emphasis):
    """A1111 sd_emphasis: Original multiplies by the weights and restores the mean, No norm only multiplies."""
    if emphasis in ("original", "no-norm"):
        before = z.mean()
        z = z * torch.tensor(w)[None, :, None]
        if emphasis == "original":
            z = z * (before / z.mean())
    return z


PAD = {"sd1": 49407, "sd2": 0}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@pytest.mark.parametrize(
    "text,emphasis,skip",
    [
        (LONG, "original", 1),
        (LONG, "original", 2),
        (LONG, "no-norm", 3),
        (LONG, "none", 1),
        (LONG, "literal", 1),
        (NEG_LONG, "original", 1),
        (BACKTRACK, "original", 2),
        ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", "original", 2),
        ("(zero:0) and (negative:-0.5) BREAK BREAK", "original", 1),
    ],
)
def test_context_matches_a1111_reference(request, family, text, emphasis, skip):
    bundle, _, _, text_model, _ = request.getfixturevalue(family)
    tok = _tokenizer(PAD[family])
    ref = ref_encode(text, text_model, tok, PAD[family], skip, emphasis, sd2=family == "sd2")
    ours = encode_prompts(bundle.cond, [text], clip_skip=skip, emphasis=emphasis)
    assert ours.shape == ref.shape
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_plain_prompt_is_bit_identical_to_the_plain_encoder(request, family):
    cond = request.getfixturevalue(family)[0].cond
    texts = ["a red circle above a blue square", "", "an oil painting, of a lighthouse at night"]
    assert torch.equal(encode_prompts(cond, texts), cond.encode(texts))


@pytest.mark.parametrize("family,skip", [("sd1", 2), ("sd2", 1)])
def test_txt2img_with_syntax_matches_diffusers_prompt_embeds(request, family, skip):
    pack = request.getfixturevalue(family)
    bundle, text_model = pack[0], pack[3]
    tok = _tokenizer(PAD[family])
    neg = "(blurry:1.3), ugly BREAK low quality"  # two chunks, as LONG
    pe = ref_encode(LONG, text_model, tok, PAD[family], skip, sd2=family == "sd2")
    ne = ref_encode(neg, text_model, tok, PAD[family], skip, sd2=family == "sd2")
    pipe = _sd_pipeline("txt2img", pack, "dpmpp_2m", True)
    ref = pipe(
        prompt_embeds=pe,
        negative_prompt_embeds=ne,
        height=16,
        width=16,
        num_inference_steps=6,
        guidance_scale=7.5,
        generator=[torch.Generator("cpu").manual_seed(11)],
        output_type="np",
    ).images
    st = Settings(steps=6, sampler="dpmpp_2m", karras=True, cfg=7.5, clip_skip=skip)
    ours = pipelines.txt2img(bundle, [LONG], [neg], [11], 16, 16, st)
    assert_images_match(ours, ref)


def test_different_chunk_counts_run_cfg_branches_apart(sd1):
    """Prompt of 3 chunks, negative of 1: two UNet calls per step (A1111's default), against a loop over
    diffusers' UNet, scheduler and VAE."""
    bundle, unet, vae, text_model, _ = sd1
    tok = _tokenizer(49407)
    prompt = LONG + " BREAK (a boat:1.2)"
    pe, ne = (ref_encode(t, text_model, tok, 49407) for t in (prompt, "blurry"))
    assert pe.shape[1] == 3 * 77 and ne.shape[1] == 77
    sched = _scheduler("euler", False, "epsilon")
    sched.set_timesteps(5)
    g = torch.Generator("cpu").manual_seed(3)
    latents = torch.randn((1, 4, 8, 8), generator=g) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            inp = sched.scale_model_input(latents, t)
            c = unet(inp, t, encoder_hidden_states=pe).sample
            u = unet(inp, t, encoder_hidden_states=ne).sample
            latents = sched.step(u + 6.0 * (c - u), t, latents).prev_sample
        ref = (vae.decode(latents / bundle.config.scale_factor).sample / 2 + 0.5).clamp(0, 1)
    ours = pipelines.txt2img(
        bundle, [prompt], ["blurry"], [3], 16, 16, Settings(steps=5, sampler="euler", karras=False, cfg=6.0)
    )
    assert_images_match(ours, ref.permute(0, 2, 3, 1).numpy())


def test_bad_options(sd1):
    bundle = sd1[0]
    with pytest.raises(ConfigError, match="--clip-skip must be at least 1"):
        pipelines.txt2img(bundle, ["x"], [""], [0], 16, 16, Settings(steps=1, clip_skip=0))
    with pytest.raises(ConfigError, match="--clip-skip 4 exceeds the text encoder's 3 layers"):
        pipelines.txt2img(bundle, ["x"], [""], [0], 16, 16, Settings(steps=1, clip_skip=4))
    with pytest.raises(ConfigError, match="--emphasis 'loud' is unknown"):
        pipelines.txt2img(bundle, ["x"], [""], [0], 16, 16, Settings(steps=1, emphasis="loud"))


# ---------------------------------------------------------------------------------------- textual inversion


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_textual_inversion_matches_diffusers(request, tmp_path, family):
    from safetensors.torch import save_file

    from latentgen.adapters.embeddings import load_embeddings

    pack = request.getfixturevalue(family)
    bundle = pack[0]
    width = bundle.cond.cfg.hidden_size
    vec = torch.randn(2, width, generator=torch.Generator().manual_seed(5)) * 0.5
    path = tmp_path / "mystyle.safetensors"
    save_file({"emb_params": vec}, str(path))
    pipe = _sd_pipeline("txt2img", pack, "euler", False)
    pipe.load_textual_inversion(str(path), token="mystyle")
    prompt = "a photo of mystyle by the sea"
    ref = pipe.encode_prompt(prompt, "cpu", 1, False)[0]
    loaded = load_embeddings([tmp_path], width)
    ours = encode_prompts(bundle.cond, [prompt], embeddings={k: v for k, (v, _) in loaded.items()})
    err = (ours - ref).abs().max().item()
    assert err < 1e-5, err
    assert (ours - encode_prompts(bundle.cond, [prompt])).abs().max() > 1e-2  # the vectors are used


def test_embedding_vectors_never_straddle_a_chunk():
    voc = clip_vocabulary(49407)
    text = " ".join(["cat"] * 74) + " mystyle dog"
    first, second = make_chunks(parse_attention(text), voc, {"mystyle": 3})
    assert first.fixes == [] and first.ids[75] == 49407  # 74 cats, then padding
    assert second.fixes == [(1, "mystyle")] and second.ids[4] == voc.tokenize("dog")[0]
    # a comma backtrack carries the vectors with their tokens
    text = " ".join(["cat"] * 60) + ", mystyle " + " ".join(["dog"] * 20)
    first, second = make_chunks(parse_attention(text), voc, {"mystyle": 3})
    assert first.fixes == [] and second.fixes == [(1, "mystyle")]
