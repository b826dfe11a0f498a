import os

import pytest
import torch

# Two cores on CI: keep intra-op threads from oversubscribing, the cores shared among
# pytest-xdist's workers (README runs two: most of a test's time is single-threaded tracing).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def heavy_tailed_rows(n: int, d: int, *, sigma: float = 1.5, seed: int = 0) -> torch.Tensor:
    """Rows with log-normal norms: a few rows carry most of the mass, as in real activations."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n, d, generator=g)
    norms = torch.exp(sigma * torch.randn(n, 1, generator=g))
    return directions / directions.norm(dim=1, keepdim=True) * norms
