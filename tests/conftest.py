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


@pytest.fixture(scope="module")
def base():
    """The SDXL base fixture (sdxl/), loaded by latentgen; the SDXL test modules skip where it is absent."""
    from sdxl_reference import BASE

    from latentgen.loading.bundle import load_model

    return load_model(str(BASE))


@pytest.fixture(scope="module")
def components():
    """The SDXL base fixture as diffusers StableDiffusionXL pipeline components (no scheduler)."""
    from sdxl_reference import base_components

    return base_components()


@pytest.fixture(scope="module", params=["folder", "file"])
def refiner(components, tmp_path_factory, request):
    """The tiny refiner loaded by latentgen as a diffusers folder, or as an original single file (the UNet's
    names converted by sdxl_reference.unet_to_original; bigG at conditioner.embedders.0) read from the file
    alone; with its diffusers components. test_sdxl_lora defines its own (the folder only)."""
    from sdxl_reference import refiner_single_file, tiny_refiner
    from test_pipelines import _scheduler

    from latentgen.loading.bundle import load_model

    tmp = tmp_path_factory.mktemp("refiner")
    parts = tiny_refiner(components, tmp / "d", _scheduler("euler", False, "epsilon"))
    if request.param == "file":
        return load_model(str(refiner_single_file(parts["unet"], tmp / "sdxl-refiner-tiny.safetensors"))), parts
    return load_model(str(tmp / "d")), parts


def pytest_configure(config):
    # Tiny models are faster on one thread, and a shared 2-core machine collapses under oversubscription.
    import torch

    torch.set_num_threads(1)
