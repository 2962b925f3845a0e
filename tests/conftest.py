import os

# Import mixfast first: it makes the CUDA torchvision wheel importable on CPU-only torch.
import mixfast  # noqa: F401
import pytest
import torch

os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# A test that sets up torch.distributed in this process (mixfast.engine.distributed.init_distributed)
# writes these into os.environ, and this process's store keeps holding MASTER_PORT; a subprocess
# started by a later test would inherit them and fail to bind that port (EADDRINUSE).
_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _rendezvous_variables_do_not_leak():
    before = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
