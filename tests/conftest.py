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


def pytest_configure(config):
    # Tiny models are faster on one thread, and a shared 2-core machine collapses under oversubscription.
    import torch

    torch.set_num_threads(1)
