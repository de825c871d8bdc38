"""pipelines.encode_prompts runs the text encoder once per distinct prompt of a batch and once for a repeated
negative, with images bit-identical to encoding every row."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_model

from latentgen import pipelines
from latentgen.loading.bundle import load_model
from latentgen.pipelines import Settings


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return load_model(str(random_model("sd1", tmp_path_factory.mktemp("enc") / "sd1.safetensors")))


def test_text_encoder_runs_once_per_distinct_prompt(bundle, monkeypatch):
    rows = []
    hook = bundle.cond.text_model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    prompts, negatives, seeds = ["a cat", "a dog", "a cat", "a cat"], ["blurry"] * 4, [1, 2, 3, 4]
    st = Settings(steps=2, sampler="euler")
    try:
        img = pipelines.txt2img(bundle, prompts, negatives, seeds, 32, 32, st)
        assert rows == [2, 1]  # "a cat", "a dog"; "blurry" once
        rows.clear()
        monkeypatch.setattr(pipelines, "once_per_distinct", lambda enc, texts: enc(list(texts)))
        ref = pipelines.txt2img(bundle, prompts, negatives, seeds, 32, 32, st)
        assert rows == [4, 4]
    finally:
        hook.remove()
    assert torch.equal(img, ref)
    assert not torch.equal(img[0], img[1]) and not torch.equal(img[0], img[2])  # seeds and prompts do count
