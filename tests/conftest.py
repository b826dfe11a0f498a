import os

import pytest
import torch

# Two cores on CI: keep intra-op threads from oversubscribing.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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
