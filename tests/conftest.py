import pytest
import torch

from fusedtune._env import interpreting

INTERP = interpreting()      # TRITON_INTERPRET as Triton reads it (1/true/yes/on/y)


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    not_interp = pytest.mark.skip(reason="interpreter test: run with TRITON_INTERPRET=1 pytest -m interp")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "interp" in item.keywords and not INTERP:
            item.add_marker(not_interp)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
