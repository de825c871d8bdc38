"""Noise sources and variation seeds: Philox 4x32-10 against the Random123 known-answer vectors, A1111's NV
generator against its recipe written out per element, torch's CUDA randn when a GPU is there, A1111's slerp, and
what they do to a txt2img run."""

import math

import numpy as np
import pytest
import torch
from tiny_models import sd1_from_fixture

from latentgen import pipelines
from latentgen.errors import ConfigError
from latentgen.loading.bundle import load_model
from latentgen.noise import PhiloxGenerator, make_generator, philox4x32, slerp
from latentgen.pipelines import Settings
from latentgen.samplers import randn

# Random123 1.14 examples/kat_vectors, the three "philox4x32 10" lines: counter, key, expected output.
KAT = [
    ("00000000 00000000 00000000 00000000", "00000000 00000000", "6627e8d5 e169c58d bc57ac4c 9b00dbd8"),
    ("ffffffff ffffffff ffffffff ffffffff", "ffffffff ffffffff", "408f276d 41c83b0e a20bc7c6 6d5451fd"),
    ("243f6a88 85a308d3 13198a2e 03707344", "a4093822 299f31d0", "d16cfe09 94fdcceb 5001e420 24126ea1"),
]


def _words(text):
    return [int(w, 16) for w in text.split()]


def test_philox4x32_10_known_answers():
    counter = np.array([_words(c) for c, _, _ in KAT], dtype=np.uint32).T  # [4, 3]: all three blocks at once
    key = np.array([_words(k) for _, k, _ in KAT], dtype=np.uint32).T
    out = philox4x32(counter, key)
    assert out.T.tolist() == [_words(o) for _, _, o in KAT]


def _philox_scalar(c, k):
    """Philox 4x32-10 on Python ints, one block (Salmon et al. 2011, the key bumped before rounds 2-10)."""
    m0, m1, w0, w1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
    for r in range(10):
        if r:
            k = [(k[0] + w0) % 2**32, (k[1] + w1) % 2**32]
        p0, p1 = m0 * c[0], m1 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 % 2**32, (p0 >> 32) ^ c[3] ^ k[1], p0 % 2**32]
    return c


def test_nv_generator_is_a1111s_recipe_element_by_element():
    """Call i, element j: block with counter (i, 0, j, 0), key (seed lo, seed hi); normal from words 0 and 1."""
    seed = 2**33 + 12345  # a key with both halves set
    g = PhiloxGenerator(seed)
    first, second = g.randn((2, 3)), g.randn((5,))
    inv = float(np.float32(2.3283064e-10))
    inv2pi = float(np.float32(2.3283064e-10 * 6.2831855))
    for call, values in ((0, first.flatten()), (1, second)):
        for j, value in enumerate(values.tolist()):
            w = _philox_scalar([call, 0, j, 0], [seed % 2**32, seed >> 32])
            u, v = w[0] * inv + inv / 2, w[1] * inv2pi + inv2pi / 2
            assert value == np.float32(math.sqrt(-2 * math.log(u)) * math.sin(v))
    assert first.dtype == torch.float32 and g.initial_seed() == seed


def test_nv_noise_is_standard_normal_and_reproducible():
    x = PhiloxGenerator(7).randn((4, 64, 64))
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02
    assert torch.equal(x, PhiloxGenerator(7).randn((4, 64, 64)))
    assert not torch.equal(x, PhiloxGenerator(8).randn((4, 64, 64)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to compare with torch's CUDA randn")
def test_nv_generator_reproduces_torch_cuda_randn():
    for seed in (0, 1234, 2**32 + 5):
        ref = torch.randn((4, 32, 32), generator=torch.Generator("cuda").manual_seed(seed), device="cuda").cpu()
        assert (PhiloxGenerator(seed).randn((4, 32, 32)) - ref).abs().max() < 1e-4
    gens = [make_generator(s, "cuda") for s in (3, 4)]
    assert randn((2, 4, 8, 8), gens).device.type == "cpu"


def test_generators_of_every_source_feed_the_samplers():
    shape = (2, 4, 8, 8)
    cpu = randn(shape, [make_generator(s, "cpu") for s in (3, 4)])
    assert torch.equal(cpu[1:], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4)))
    nv = randn(shape, [make_generator(s, "nv") for s in (3, 4)])
    assert torch.equal(nv[1:], PhiloxGenerator(4).randn((1, 4, 8, 8)))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--rng cuda"):
            make_generator(1, "cuda")
        with pytest.raises(ConfigError, match="--rng cuda"):
            Settings(rng="cuda").check()  # refused before any work, not per image
    with pytest.raises(ConfigError, match="--rng"):
        make_generator(1, "mt19937")


def _slerp_rows(t, a, b):
    """Spherical interpolation written per row: for each (c, w), the vectors a[c, :, w] and b[c, :, w]."""
    out = torch.empty_like(a)
    for c in range(a.shape[0]):
        for w in range(a.shape[2]):
            x, y = a[c, :, w].double(), b[c, :, w].double()
            cos = (x / x.norm()) @ (y / y.norm())
            om = math.acos(cos)
            out[c, :, w] = (math.sin((1 - t) * om) * x + math.sin(t * om) * y) / math.sin(om)
    return out


def test_slerp_is_a1111s_variation_blend():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    for t in (0.0, 0.3, 1.0):
        assert (slerp(t, a, b) - _slerp_rows(t, a, b)).abs().max() < 1e-5
    assert torch.allclose(slerp(0.0, a, b), a, atol=1e-6) and torch.allclose(slerp(1.0, a, b), b, atol=1e-6)


@pytest.fixture(scope="module")
def sd1(fixtures_dir, fixture_config, tmp_path_factory):
    path = sd1_from_fixture(fixtures_dir, fixture_config, tmp_path_factory.mktemp("noise") / "sd1.safetensors")
    return load_model(str(path))


def _run(bundle, seeds, **kw):
    return pipelines.txt2img(bundle, ["a dot"] * len(seeds), [""] * len(seeds), seeds, 16, 16, Settings(steps=3, **kw))


def test_variation_seeds_in_txt2img(sd1):
    """Strength 0 is the seed's image; strength 1 starts from the variation seed's noise (with a deterministic
    sampler: the variation seed's image); in between, neither; image i uses variation seed V + i."""
    base = _run(sd1, [10, 11], sampler="euler")
    assert torch.equal(_run(sd1, [10, 11], sampler="euler", subseed=50, subseed_strength=0.0), base)
    full = _run(sd1, [10, 11], sampler="euler", subseed=50, subseed_strength=1.0)
    assert (full - _run(sd1, [50, 51], sampler="euler")).abs().max() < 1e-5
    half = _run(sd1, [10, 11], sampler="euler", subseed=50, subseed_strength=0.5)
    assert (half - base).abs().max() > 1e-2 and (half - full).abs().max() > 1e-2
    one = _run(sd1, [11], sampler="euler", subseed=51, subseed_strength=0.5)
    assert (one - half[1:]).abs().max() < 1e-5
    with pytest.raises(ConfigError, match="--subseed-strength"):
        Settings(subseed=1, subseed_strength=1.5).check()


def test_rng_and_eta_noise_seed_delta_in_txt2img(sd1):
    """NV noise starts the run from PhiloxGenerator(seed); ENSD moves only the step noise of ancestral samplers."""
    cpu, nv = _run(sd1, [3], sampler="euler"), _run(sd1, [3], sampler="euler", rng="nv")
    assert (cpu - nv).abs().max() > 1e-2
    st = Settings(steps=3, sampler="euler", rng="nv")
    noise, _ = pipelines.initial_noise((1, 4, 2, 2), [3], pipelines.generators([3], "nv"), st, "cpu")
    assert torch.equal(noise, PhiloxGenerator(3).randn((1, 4, 2, 2)))
    assert torch.equal(_run(sd1, [3], sampler="euler", ensd=31337), cpu)
    a = _run(sd1, [3], sampler="euler_a")
    b = _run(sd1, [3], sampler="euler_a", ensd=31337)
    assert (a - b).abs().max() > 1e-3
    _, gens = pipelines.initial_noise((1, 4, 2, 2), [3], pipelines.generators([3]), Settings(ensd=31337), "cpu")
    assert gens[0].initial_seed() == 3 + 31337
