import os
from pathlib import Path

import pytest
import torch

# Two cores on CI: keep intra-op threads bounded so parallel test processes don't thrash.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO = Path(__file__).resolve().parents[1]
SHARED_REAL = REPO.parent / "shared" / "nuscenes_real"


@pytest.fixture(scope="session")
def real_root() -> Path:
    """The real nuScenes fragments beside the checkout; tests that need them skip when absent."""
    if not SHARED_REAL.is_dir():
        pytest.skip(f"real nuScenes fragments not found at {SHARED_REAL}")
    return SHARED_REAL


@pytest.fixture(scope="session")
def stages(tmp_path_factory):
    """VAE → teacher → MFD trained for 2 steps each on a tiny prepared set (tests/stage_fixtures.py)."""
    from stage_fixtures import train_tiny_stages

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_tiny_stages(tmp_path_factory.mktemp("stages"))
    finally:
        torch.set_num_threads(n)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` need CUDA: without it they are skipped, saying so (tools/gpu_check.py runs them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: CUDA is not available (run tools/gpu_check.py on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
