"""τθ encoders and tokenizers vs the original code's outputs (fixtures), transformers and diffusers."""

import dataclasses
import gzip
import json
from importlib import resources

import pytest
import torch
from safetensors.torch import load_file

from latentgen.errors import CheckpointError, ConfigError, InputError
from latentgen.text import clip, tokenizers
from latentgen.text import config as C

FIXTURES = ("sd1-tiny", "sd2-tiny", "ldm-kl-bert-tiny")
PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "",
    "   ",
    "Hello, World!! what's up? (4k) -- #1 [best] {art} @home 3.14159 1,000,000",
    "café naïve résumé Ørsted 東京タワー 🚀🔥 emoji's",
    "UPPER lower MiXeD   tabs\tand\nnewlines",
    "it's we're they've I'm you'll he'd don't",
    "a " * 75,  # 75 words: exactly 77 tokens with bos/eos
    "a " * 76,  # one over
    "a very long prompt, " * 30,
]


def scaled_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs() / ref.float().abs().clamp(min=1)).max().item()


def cond_stage(sd: dict) -> dict:
    return {k[len("cond_stage_model.") :]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}


@pytest.fixture(scope="module")
def fixture_data(fixtures_dir, fixture_config):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = (
                cond_stage(load_file(fixtures_dir / f"{name}.safetensors")),
                load_file(fixtures_dir / f"{name}.orig-ref.safetensors"),
                fixture_config(name),
            )
        return cache[name]

    return get


def heads_of(te: dict) -> dict:
    if te["kind"] == "ldm_bert":
        return {"heads": te["heads"]}
    return {"num_attention_heads": te.get("num_attention_heads", te.get("heads"))}


def loaded(cond_sd: dict, te: dict, **overrides):
    cfg = C.CondConfig.from_state_dict(cond_sd, **heads_of(te), **overrides)
    model = C.build_conditioner(cfg).eval()
    model.load_original_state_dict(cond_sd)
    return model


# ------------------------------------------------------------------------------------- fixtures (original code)


@pytest.mark.parametrize("name", FIXTURES)
def test_encoder_matches_original_outputs(fixture_data, name):
    cond_sd, ref, cfg = fixture_data(name)
    model = loaded(cond_sd, cfg["text_encoder"])
    assert model.context_dim == cfg["context_dim"]
    with torch.no_grad():
        cond = model(ref["in.text.ids"])
    assert cond.shape == ref["out.text.cond"].shape
    assert scaled_err(cond, ref["out.text.cond"]) < 1e-5
    if name == "sd2-tiny":
        assert scaled_err(cond, ref["out.text.penultimate"]) < 1e-5
        last = loaded(cond_sd, cfg["text_encoder"], layer="last")
        with torch.no_grad():
            assert scaled_err(last(ref["in.text.ids"]), ref["out.text.last"]) < 1e-5
    else:
        assert scaled_err(cond, ref["out.text.last"]) < 1e-5
    if name == "sd1-tiny":  # penultimate = final LN of the second-to-last block's output
        pen = loaded(cond_sd, cfg["text_encoder"], layer="penultimate")
        with torch.no_grad():
            want = pen.text_model.final_layer_norm(ref["out.text.penultimate_raw"])
            assert scaled_err(pen(ref["in.text.ids"]), want) < 1e-5


@pytest.mark.parametrize("name", FIXTURES)
def test_from_state_dict_infers_fixture_config(fixture_data, name):
    cond_sd, _, cfg = fixture_data(name)
    te = cfg["text_encoder"]
    got = C.CondConfig.from_state_dict(cond_sd)
    if te["kind"] == "ldm_bert":
        assert (got.kind, got.n_embed, got.n_layer, got.vocab_size, got.max_seq_len) == (
            "bert",
            te["n_embed"],
            te["n_layer"],
            te["vocab_size"],
            te["max_seq_len"],
        )
        assert (got.heads, got.dim_head, got.n_embed * got.ff_mult) == (te["heads"], te["dim_head"], te["ff_inner_dim"])
    else:
        open_clip = te["kind"] == "open_clip"
        want = dict(
            kind="open_clip" if open_clip else "clip",
            vocab_size=te["vocab_size"],
            hidden_size=te["width"] if open_clip else te["hidden_size"],
            intermediate_size=int(te["width"] * te["mlp_ratio"]) if open_clip else te["intermediate_size"],
            num_hidden_layers=te["layers"] if open_clip else te["num_hidden_layers"],
            max_position_embeddings=te["context_length"] if open_clip else te["max_position_embeddings"],
            hidden_act="gelu" if open_clip else te["hidden_act"],
            layer=te["cond_stage_output"],
            pad_token_id=0 if open_clip else te["pad_token_id"],
        )
        assert {k: getattr(got, k) for k in want} == want
    # the original YAML gives the same result
    ldm_cond = cfg["ldm_config"]["model"]["params"]["cond_stage_config"]
    assert C.CondConfig.from_ldm(ldm_cond, cond_sd) == got


@pytest.mark.parametrize(
    "keys_file, want",
    [
        (
            "sd15-keys.json",
            dict(
                kind="clip",
                hidden_size=768,
                num_attention_heads=12,
                num_hidden_layers=12,
                intermediate_size=3072,
                hidden_act="quick_gelu",
                layer="last",
                pad_token_id=49407,
            ),
        ),
        (
            "sd21-v-keys.json",
            dict(
                kind="open_clip",
                hidden_size=1024,
                num_attention_heads=16,
                num_hidden_layers=24,
                intermediate_size=4096,
                hidden_act="gelu",
                layer="penultimate",
                pad_token_id=0,
            ),
        ),
    ],
)
def test_from_state_dict_full_size_conventions(fixtures_dir, keys_file, want):
    shapes = json.loads((fixtures_dir / keys_file).read_text())
    sd = cond_stage({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    got = C.CondConfig.from_state_dict(sd)
    assert {k: getattr(got, k) for k in want} == want
    # and the full-size module accepts exactly these keys (built on the meta device: no memory)
    with torch.device("meta"):
        model = C.build_conditioner(got)
    meta_sd = {k: torch.empty(v.shape, device="meta") for k, v in model.state_dict().items()}
    if got.kind == "open_clip":
        expected = {**clip.clip_to_openclip(meta_sd), "model.text_projection": 0, "model.logit_scale": 0}
    else:
        expected = {**meta_sd, "transformer.text_model.embeddings.position_ids": 0}
    assert set(expected) == set(sd)


def test_layouts_convert_both_ways(fixture_data):
    sd1, ref1, cfg1 = fixture_data("sd1-tiny")
    model = loaded(sd1, cfg1["text_encoder"])
    ours = model.original_state_dict()
    assert set(ours) == set(sd1) - {"transformer.text_model.embeddings.position_ids"}
    # diffusers folder text_encoder (transformers <5 and >=5 layouts) loads to the same model
    for prefix in ("text_model.", ""):
        other = C.build_conditioner(model.cfg)
        other.load_original_state_dict({prefix + k[len("transformer.text_model.") :]: v for k, v in ours.items()})
        assert all(torch.equal(v, other.original_state_dict()[k]) for k, v in ours.items())
    # OpenCLIP: our SD1-style layout maps back to the original file's tensors exactly
    sd2, _, cfg2 = fixture_data("sd2-tiny")
    back = clip.clip_to_openclip(loaded(sd2, cfg2["text_encoder"]).original_state_dict())
    assert set(back) == set(sd2) - {"model.text_projection", "model.logit_scale"}
    assert all(torch.equal(v, sd2[k]) for k, v in back.items())


# ---------------------------------------------------------------------------------------- vs diffusers


def test_openclip_conversion_matches_diffusers():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    width, layers, vocab, ctx = 32, 3, 49408, 77
    g = torch.Generator().manual_seed(3)

    def rnd(*shape, scale=None):
        return torch.randn(shape, generator=g) * (scale if scale is not None else shape[-1] ** -0.5)

    sd = {
        "model.token_embedding.weight": rnd(vocab, width, scale=0.5),
        "model.positional_embedding": rnd(ctx, width, scale=0.5),
        "model.ln_final.weight": 1 + rnd(width, scale=0.2),
        "model.ln_final.bias": rnd(width, scale=0.2),
        "model.text_projection": rnd(width, 16),
        "model.logit_scale": rnd(scale=0.1),
    }
    for i in range(layers):
        p = f"model.transformer.resblocks.{i}."
        sd.update(
            {
                p + "ln_1.weight": 1 + rnd(width, scale=0.2),
                p + "ln_1.bias": rnd(width, scale=0.2),
                p + "attn.in_proj_weight": rnd(3 * width, width),
                p + "attn.in_proj_bias": rnd(3 * width, scale=0.1),
                p + "attn.out_proj.weight": rnd(width, width),
                p + "attn.out_proj.bias": rnd(width, scale=0.1),
                p + "ln_2.weight": 1 + rnd(width, scale=0.2),
                p + "ln_2.bias": rnd(width, scale=0.2),
                p + "mlp.c_fc.weight": rnd(4 * width, width),
                p + "mlp.c_fc.bias": rnd(4 * width, scale=0.1),
                p + "mlp.c_proj.weight": rnd(width, 4 * width),
                p + "mlp.c_proj.bias": rnd(width, scale=0.1),
            }
        )
    ids = torch.randint(0, vocab, (2, ctx), generator=g)

    ours = C.build_conditioner(C.CondConfig.from_state_dict(sd, num_attention_heads=2)).eval()
    ours.load_original_state_dict(sd)

    ref = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=4 * width,
            num_hidden_layers=layers,
            num_attention_heads=2,
            hidden_act="gelu",
            max_position_embeddings=ctx,
        )
    ).eval()
    converted = convert_open_clip_checkpoint(ref, {"cond_stage_model." + k: v for k, v in sd.items()})
    converted.pop("text_projection.weight", None)  # in its ignore list; CLIPTextModel has none
    ref.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    with torch.no_grad():
        want = ref.final_layer_norm(ref(input_ids=ids, output_hidden_states=True).hidden_states[-2])
        got = ours(ids)
    assert (got - want).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def hf_clip_tokenizer(tmp_path_factory):
    """transformers CLIPTokenizer from vocab.json / merges.txt written from the shipped gz (open_clip recipe)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = (
        gzip.decompress(resources.files("latentgen").joinpath("assets", "bpe_simple_vocab_16e6.txt.gz").read_bytes())
        .decode("utf-8")
        .split("\n")[1 : 49152 - 256 - 2 + 1]
    )
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [line.replace(" ", "") for line in lines]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    d = tmp_path_factory.mktemp("clip_tok")
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    return CLIPTokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt"))


@pytest.mark.filterwarnings("ignore::latentgen.text.tokenizers.TruncationWarning")
def test_clip_tokenizer_matches_transformers(hf_clip_tokenizer):
    want = hf_clip_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with pytest.warns(tokenizers.TruncationWarning, match="prompt 9"):
        got = tokenizers.tokenize_clip(PROMPTS)
    assert len(hf_clip_tokenizer) == 49408
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    assert torch.equal(got, want["input_ids"])
    assert got[1, :3].tolist() == [49406, 49407, 49407]
    assert got[9, -1].item() == 49407 and got[7, -1].item() == 49407  # eos kept last when truncated / full


@pytest.mark.filterwarnings("ignore::latentgen.text.tokenizers.TruncationWarning")
def test_clip_tokenizer_sd2_pads_with_zero(hf_clip_tokenizer):
    want = hf_clip_tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    got = tokenizers.tokenize_clip(PROMPTS, pad_token_id=0)
    assert torch.equal(got, want["input_ids"].masked_fill(want["attention_mask"] == 0, 0))
    assert got[1, :3].tolist() == [49406, 49407, 0]
    # diffusers' SD 2 tokenizer (pad '!') agrees where the prompt has no '!'
    from transformers import CLIPTokenizer

    sd2 = CLIPTokenizer(vocab=dict(hf_clip_tokenizer.get_vocab()), merges=tokenizers.clip_bpe_vocab()[1], pad_token="!")
    plain = [p for p in PROMPTS if "!" not in p]
    ref = sd2(plain, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    assert torch.equal(tokenizers.tokenize_clip(plain, pad_token_id=0), ref)


@pytest.mark.parametrize("name, pad", [("sd1-tiny", 49407), ("sd2-tiny", 0)])
def test_clip_tokenizer_matches_original_tokenizers(fixtures_dir, name, pad):
    """Rows tokenized by FrozenCLIPEmbedder (transformers) / open_clip.tokenize, incl. '!!' and truncation."""
    from safetensors import safe_open

    with safe_open(fixtures_dir / f"{name}.orig-ref.safetensors", "pt") as f:
        meta = f.metadata()
        text_ids, sample_ids, uncond = (
            f.get_tensor(k) for k in ("in.text.ids", "in.sample.ids", "in.sample.ids_uncond")
        )
    with pytest.warns(tokenizers.TruncationWarning):
        assert torch.equal(tokenizers.tokenize_clip(json.loads(meta["text_prompts"]), pad), text_ids[:2])
    assert torch.equal(tokenizers.tokenize_clip(json.loads(meta["sample_prompts"]), pad), sample_ids)
    assert torch.equal(tokenizers.tokenize_clip([meta["sample_negative"]], pad), uncond)


def test_bert_tokenizer_matches_python_bert(tmp_path):
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_bytes(resources.files("latentgen").joinpath("assets", "bert_vocab.txt").read_bytes())
    slow = BertTokenizerLegacy(vocab_file=str(vocab_file), do_lower_case=True)
    assert len(slow) == tokenizers.bert_tokenizer().get_vocab_size() == 30522
    for n in (77, 24):  # 24: the shipped default's context, where shapes captions fit and long prompts are cut
        want = slow(PROMPTS, padding="max_length", max_length=n, truncation=True, return_tensors="pt")["input_ids"]
        with pytest.warns(tokenizers.TruncationWarning):
            got = tokenizers.tokenize_bert(PROMPTS, max_length=n)
        assert torch.equal(got, want), n
    lines = vocab_file.read_text().split("\n")
    assert (
        tokenizers.tokenize_bert(["a red circle"])[0, :6].tolist()
        == [101, lines.index("a"), lines.index("red"), lines.index("circle"), 102, 0]
        == [101, 1037, 2417, 4418, 102, 0]
    )
    assert tokenizers.tokenize_bert([""])[0, :3].tolist() == [101, 102, 0]


# ------------------------------------------------------------------------------- class / none / API


def test_class_embedder_and_none():
    cfg = C.CondConfig.from_state_dict({"embedding.weight": torch.empty(1001, 16)})
    assert (cfg.kind, cfg.n_classes, cfg.embed_dim, cfg.null_label) == ("class", 1001, 16, 1000)
    model = C.build_conditioner(cfg)
    w = torch.randn(1001, 16)
    model.load_original_state_dict({"embedding.weight": w})
    ctx = model.encode([3, "5", model.null_label])
    assert ctx.shape == (3, 1, 16) and torch.equal(ctx[:, 0], w[[3, 5, 1000]])
    with pytest.raises(InputError, match="1001"):
        model.encode([1001])
    with pytest.raises(InputError):
        model.encode(["cat"])
    assert C.CondConfig.from_state_dict({"embedding.weight": torch.empty(1000, 16)}).null_label is None

    none = C.build_conditioner(C.CondConfig.from_state_dict({}))
    assert none.kind == "none" and none.context_dim is None and none.encode(["x"]) is None
    none.load_original_state_dict({})
    with pytest.raises(CheckpointError, match="embedding.weight"):
        none.load_original_state_dict({"embedding.weight": w})


def test_config_dict_roundtrip_and_errors(fixture_data):
    for name in FIXTURES:
        cfg = C.CondConfig.from_state_dict(fixture_data(name)[0])
        assert C.CondConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="bogus"):
        C.CondConfig.from_dict({"kind": "clip", "bogus": 1})
    with pytest.raises(ConfigError, match="t5"):
        C.CondConfig(kind="t5")
    with pytest.raises(ConfigError, match="num_attention_heads"):
        C.CondConfig(hidden_size=48, num_attention_heads=5)
    with pytest.raises(ConfigError, match="Frozen"):
        C.CondConfig.from_ldm({"target": "ldm.modules.encoders.modules.FrozenT5Embedder"})
    assert (
        C.CondConfig.from_ldm(
            {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "params": {"layer": "penultimate"}}
        ).context_dim
        == 1024
    )


@pytest.mark.parametrize("name", FIXTURES)
def test_bad_weights_name_the_keys(fixture_data, name):
    cond_sd, _, cfg = fixture_data(name)
    model = C.build_conditioner(C.CondConfig.from_state_dict(cond_sd, **heads_of(cfg["text_encoder"])))
    victim = sorted(k for k in cond_sd if k.endswith("bias"))[0]

    missing = {k: v for k, v in cond_sd.items() if k != victim}
    with pytest.raises(CheckpointError, match=f"missing cond_stage_model.{victim}"):
        model.load_original_state_dict(missing)
    with pytest.raises(CheckpointError, match="unexpected cond_stage_model.extra.weight"):
        model.load_original_state_dict({**cond_sd, "extra.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match=rf"mis-shaped cond_stage_model.{victim} \[3\]"):
        model.load_original_state_dict({**cond_sd, victim: torch.zeros(3)})
    wrong = C.build_conditioner(
        dataclasses.replace(
            model.cfg, **({"n_layer": 1} if model.kind == "bert" else {"num_hidden_layers": 2, "layer": "last"})
        )
    )
    with pytest.raises(CheckpointError, match="unexpected"):
        wrong.load_original_state_dict(cond_sd)


@pytest.mark.parametrize("name", FIXTURES)
def test_encode_and_bfloat16(fixture_data, name):
    cond_sd, ref, cfg = fixture_data(name)
    model = loaded(cond_sd, cfg["text_encoder"])
    if model.kind == "bert":
        ids = tokenizers.tokenize_bert(["a red circle", ""])
        assert torch.equal(ids[1, :3], torch.tensor([101, 102, 0]))
        assert torch.equal(model.encode(["a red circle", ""]), model(ids))
    else:
        assert torch.equal(model.encode(["a red cube on top of a blue sphere"]), model(ref["in.sample.ids"][:1]))
    ids = ref["in.text.ids"]
    with torch.no_grad():
        fp32 = model(ids)
        bf16 = model.to(torch.bfloat16)(ids)
    assert bf16.dtype == torch.bfloat16
    assert scaled_err(bf16, fp32) < 0.1
