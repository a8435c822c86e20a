import os
import sys
from pathlib import Path

# Triton (tests/test_kernels.py) runs on the CPU only through its interpreter, which must be chosen before
# triton is first imported (importing transformers imports it).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Test helpers (the naive oracle) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real `code` corpus (stdlib, headers, ...) with a 512-token BPE, built once per test session."""
    from atlas_fixtures import corpus as build_small_corpus

    return build_small_corpus(tmp_path_factory.getbasetemp())


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: one thread avoids thread start-up and contention costs (several times faster).
    import torch

    torch.set_num_threads(1)
