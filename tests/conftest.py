import sys
from pathlib import Path

import pytest

# Test helpers (the naive oracle) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real `code` corpus (stdlib, headers, ...) with a 512-token BPE, built once per test session."""
    from monet.data import build_corpus

    base = tmp_path_factory.getbasetemp()
    path = base / "monet-train-corpus"
    if not (path / "manifest.json").is_file():
        build_corpus("code", path, max_bytes=300_000, vocab_size=512, progress=False, cache_dir=base / "cache")
    return path


def pytest_configure(config: pytest.Config) -> None:
    # The test models are tiny: one thread avoids thread start-up and contention costs (several times faster).
    import torch

    torch.set_num_threads(1)
