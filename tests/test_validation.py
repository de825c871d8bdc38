"""The validation layer (latentgen.validation): one set of checks for command-line options, JSON-line items and
recipes. Each bad value is refused with a message naming the field as its source spells it; good values come back
in their Python types."""

from __future__ import annotations

import math

import pytest

from latentgen import validation as v
from latentgen.errors import ConfigError

BAD = [
    ("steps", 0, "out of range: use 1..1000"),
    ("steps", 100000, "out of range: use 1..1000"),
    ("steps", "many", "must be an integer, not 'many'"),
    ("steps", 2.5, "must be an integer"),
    ("steps", True, "must be an integer"),
    ("num", 1e9, "out of range: use 1..64"),
    ("num", 0, "out of range"),
    ("width", 0, "out of range: use 1..8192 pixels"),
    ("width", 100000, "out of range: use 1..8192 pixels"),
    ("height", -16, "out of range"),
    ("seed", "abc", "must be an integer, not 'abc'"),
    ("seed", 2**70, r"out of range: use 0..9223372036854775807 \(2\*\*63-1\), or -1 for a random seed"),
    ("seed", -2, "out of range"),
    ("cfg", math.nan, "must be a finite number, not nan"),
    ("cfg", math.inf, "must be a finite number, not inf"),
    ("cfg", "high", "must be a number, not 'high'"),
    ("cfg", -1, r"out of range: use \[0, 100\]"),
    ("eta", -1, r"out of range: use \[0, 1\]"),
    ("eta", 1.5, "out of range"),
    ("strength", 0, r"out of range: use \(0, 1\]"),
    ("strength", 1.01, "out of range"),
    ("sampler", "dpm_fast", "unknown sampler 'dpm_fast'; choose one of ddim, plms, euler, euler_a"),
    ("spacing", "even", "must be one of leading, trailing, linspace"),
    ("karras", "yes", "must be true or false"),
    ("prompt", 5, "must be a string, not 5"),
    ("negative", ["x"], "must be a string"),
    ("noise_level", 5000, "out of range: use 0..1000"),
    ("mask_blur", -1, "out of range"),
    ("class", "cat", "must be an integer"),
    ("dtype", "int8", "must be one of auto, fp32"),
]


@pytest.mark.parametrize(("field", "value", "message"), BAD, ids=[f"{f}={x!r}"[:40] for f, x, _ in BAD])
def test_bad_values_name_their_field_in_every_source(field, value, message):
    flag = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{flag} .*{message}"):
        v.check({field: value})
    with pytest.raises(ConfigError, match=rf'^stdin line 3: "{field}" .*{message}'):
        v.check({field: value}, "stdin line 3")
    with pytest.raises(ConfigError, match=rf'^x.png: recipe: "{field}" .*{message}'):
        v.check({field: value}, "x.png: recipe")


def test_good_values_come_back_typed_and_unknown_fields_pass():
    got = v.check({"steps": 7.0, "cfg": 3, "seed": -1, "num": 2, "karras": False, "model_hash": "abc", "x": None})
    assert got == {"steps": 7, "cfg": 3.0, "seed": -1, "num": 2, "karras": False, "model_hash": "abc", "x": None}
    assert type(got["steps"]) is int and type(got["cfg"]) is float
    assert v.check({"seed": v.SEED_MAX, "strength": 1.0, "eta": 0, "steps": None})["seed"] == 2**63 - 1


def test_seed_plus_images_must_stay_in_range():
    v.check_seeds(v.SEED_MAX - 3, 4)
    with pytest.raises(ConfigError, match=r"--seed 9223372036854775805 \+ 4 images passes"):
        v.check_seeds(v.SEED_MAX - 2, 4)
    v.check_seeds(v.RANDOM_SEED, 64)


def test_samplers_schedulers_and_rngs_are_their_registries():
    """Every sampler by our, A1111's or ComfyUI's name passes, as given; anything else is refused naming the field."""
    from latentgen.noise import RNGS
    from latentgen.samplers import SAMPLERS
    from latentgen.schedulers import SCHEDULERS

    for name in (*SAMPLERS, "Euler a", "DPM++ 2M Karras", "DPM2 a Karras"):
        assert v.check({"sampler": name})["sampler"] == name
    with pytest.raises(ConfigError, match="--sampler must name a sampler: unknown sampler 'warp'"):
        v.check({"sampler": "warp"})
    assert v.scheduler_names() == tuple(SCHEDULERS) and v.rng_names() == tuple(RNGS)
    with pytest.raises(ConfigError, match='x.png: recipe: "rng" must be one of cpu, cuda, nv'):
        v.check({"rng": "gpu"}, "x.png: recipe")
    with pytest.raises(ConfigError, match="--subseed-strength 2 is out of range"):
        v.check({"subseed_strength": 2})
