"""Suite-wide set-up.

Without a GPU, Triton kernels run through the interpreter: `TRITON_INTERPRET` must be set before any module that
defines `@triton.jit` kernels is imported, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tests.helpers.backends import BACKEND_FLAGS  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules of tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): with several intra-op
    threads on a shared machine every small op waits on thread hand-offs (a 2 ms op becomes 6 ms), so such a module
    runs single-threaded and restores the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def env(monkeypatch):
    """`monkeypatch` with the backend-selection flags cleared, so a test picks its op backend itself."""
    for flag in BACKEND_FLAGS:
        monkeypatch.delenv(flag, raising=False)
    return monkeypatch


@pytest.fixture
def threads():
    """Restores torch's intra-op thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# The tiny random edit pipelines (nftcore.testing.tiny_pipelines), built once per test module that asks for one.


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory):
    from nftcore.testing.tiny_pipelines import build_kontext_pipeline

    return build_kontext_pipeline(tmp_path_factory.mktemp("kontext"))


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    from nftcore.testing.tiny_pipelines import build_qwen_edit_pipeline

    return build_qwen_edit_pipeline(tmp_path_factory.mktemp("qwen-edit"))
