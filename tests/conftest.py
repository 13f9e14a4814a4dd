import pyro
import pytest
import torch

torch.set_num_threads(1)  # tests run in two workers side by side (make test: pytest -n 2)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Every test starts from a known seed and an empty Pyro param store."""
    # torch._dynamo's first use switches torch.distributions' argument validation off for the whole
    # process; every test starts from the default (on), whatever ran before it in this worker
    torch.distributions.Distribution.set_default_validate_args(True)
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"))])
def device(request) -> torch.device:
    """Every device this machine has: cpu, and cuda where a GPU is present (the cuda cases are skipped otherwise)."""
    return torch.device(request.param)
