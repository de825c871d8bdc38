import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    if not (FIXTURES / "sd1-tiny.safetensors").exists():
        pytest.skip(f"reference fixtures not found at {FIXTURES} (they live in ../shared/fixtures)")
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_config(fixtures_dir):
    def load(name: str) -> dict:
        return json.loads((fixtures_dir / f"{name}.json").read_text())

    return load


@pytest.fixture(scope="module")
def sd1(fixtures_dir, fixture_config, tmp_path_factory):
    """(bundle, diffusers UNet, VAE, text encoder, prediction) of the sd1-tiny fixture, for the tests against
    diffusers (test_pipelines._pair). A module that means another model by `sd1` defines its own."""
    pytest.importorskip("diffusers")
    from test_pipelines import _pair

    return _pair(fixtures_dir, fixture_config, tmp_path_factory, "sd1-tiny", {}, "<|endoftext|>", "epsilon")


@pytest.fixture(scope="module")
def sd2(fixtures_dir, fixture_config, tmp_path_factory):
    """The same for the sd2-tiny fixture (v-prediction, OpenCLIP text encoder)."""
    pytest.importorskip("diffusers")
    from test_pipelines import _pair

    return _pair(fixtures_dir, fixture_config, tmp_path_factory, "sd2-tiny", {}, "!", "v_prediction")


def pytest_configure(config):
    # Tiny models are faster on one thread, and a shared 2-core machine collapses under oversubscription.
    import torch

    torch.set_num_threads(1)
