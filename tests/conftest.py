"""Shared pytest fixtures: where the shared data lives, and a fresh random generator per test."""
import os
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("BERTQA_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_dir():
    """../shared/data (or $BERTQA_DATA_DIR); the test skips when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR} (set BERTQA_DATA_DIR)")
    return DATA_DIR


@pytest.fixture
def rng(request):
    """Fresh random inputs each run; the seed is printed on failure so a case can be replayed."""
    seed = int(os.environ.get("BERTQA_TEST_SEED", np.random.SeedSequence().entropy % (2**32)))
    request.node.user_properties.append(("seed", seed))
    print(f"BERTQA_TEST_SEED={seed}")
    return np.random.default_rng(seed)


@pytest.fixture(scope="session")
def shared_data_dir():
    """data_dir for session- and module-scoped fixtures (built once, e.g. SQuAD features); skips likewise."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR} (set BERTQA_DATA_DIR)")
    return DATA_DIR


def pytest_configure(config):
    # GPU tests (tests/test_cuda.py): skipped with the reason where no CUDA GPU is usable; `pytest -m cuda` runs them
    config.addinivalue_line("markers", "cuda: needs an NVIDIA GPU of compute capability 8.0+ (skipped otherwise)")


@pytest.fixture(params=["avx2", "avx512"])
def isa(request):
    """Runs the test once per instruction set of bertqa's own kernels (bertqa.ops.set_isa): AVX2, the fallback,
    and AVX-512, which skips with the reason on a CPU without it. Afterwards the import-time choice is back."""
    from bertqa import ops

    isas = ops.runtime_info()["isas"]
    if request.param == "avx512" and "avx512" not in isas:
        pytest.skip(f"this CPU cannot run the AVX-512 kernels (it runs {isas}: AVX-512 needs F, BW, DQ and VL)")
    ops.set_isa(request.param)
    try:
        yield request.param
    finally:
        ops.set_isa(os.environ.get("BERTQA_CPU") or "auto")


# ---- containers (tests/containers.py): one private podman store and one build of the image per session ---------


@pytest.fixture(scope="session")
def podman():
    """podman (runc, a private store with the stand-in base images); installs the tools or skips naming them."""
    import containers as C

    why = C.install_tools()
    if why:
        pytest.skip(why)
    p = C.Podman()
    p.remove_labelled()
    C.ensure_base_images(p)
    yield p
    p.remove_labelled()


@pytest.fixture(scope="session")
def image(podman):
    """The CPU image built from the repository's Dockerfile (tag localhost/bertqa:test in the private store)."""
    import containers as C

    took, _ = C.build_image(podman)
    print(f"image build: {took:.0f} s")
    return C.IMAGE
