"""Triton kernels against their float32 torch references, on odd shapes.

These need the kernels to run: on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (which must be
set before Triton is imported — ``test_interpreter_suite`` re-runs this file in a subprocess with
it set, so the plain test command covers the real kernels).
"""

import os
import subprocess
import sys

import pytest
import torch

from wtacompile import kernels

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(
    not kernels.TRITON_AVAILABLE or not (INTERPRETING or torch.cuda.is_available()),
    reason="Triton kernels run on CUDA or under TRITON_INTERPRET=1",
)
SHAPES = [(101, 129, 37), (1, 7, 1), (64, 16, 64), (33, 257, 5)]  # (N rows, D, k kept)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_row_norms(n, d, k):
    x = torch.randn(n, d, device=DEVICE)
    assert kernels.uses_triton(x)
    torch.testing.assert_close(kernels.row_norms(x), kernels.row_norms_reference(x), rtol=1e-5, atol=1e-5)
    xt = torch.randn(d, n, device=DEVICE).t()  # strided rows
    torch.testing.assert_close(kernels.row_norms(xt), kernels.row_norms_reference(xt), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize("n,d,k", SHAPES)
def test_gather_scale(n, d, k):
    x = torch.randn(n, d, device=DEVICE)
    index = torch.randint(0, n, (k,), device=DEVICE)
    scale = torch.rand(k, device=DEVICE) * 3
    torch.testing.assert_close(
        kernels.gather_scale(x, index, scale), kernels.gather_scale_reference(x, index, scale),
        rtol=1e-6, atol=1e-6,
    )


@needs_kernels
@pytest.mark.interpreter
@pytest.mark.parametrize("n,d,k", SHAPES)
@pytest.mark.parametrize("n_out", [3, 70])
def test_sampled_weight_grad(n, d, k, n_out):
    grad_out = torch.randn(n, n_out, device=DEVICE)
    index = torch.randint(0, n, (k,), device=DEVICE)
    x_saved = torch.randn(k, d, device=DEVICE)
    torch.testing.assert_close(
        kernels.sampled_weight_grad(grad_out, index, x_saved),
        kernels.sampled_weight_grad_reference(grad_out, index, x_saved),
        rtol=1e-4, atol=1e-4,
    )


@needs_kernels
@pytest.mark.interpreter
def test_sampled_linear_end_to_end_on_kernels():
    """The op's forward and backward on the kernels equal the references for the rows it chose."""
    from wtacompile.ops import linear_with_sampled_grad, sample_input

    torch.manual_seed(0)
    x = torch.randn(3, 37, 24, device=DEVICE, requires_grad=True)
    w = torch.randn(10, 24, device=DEVICE, requires_grad=True)
    b = torch.randn(10, device=DEVICE, requires_grad=True)
    index, x_saved = sample_input(x, 0.3)
    out = linear_with_sampled_grad(x, w, b, index, x_saved)
    assert torch.equal(out, torch.nn.functional.linear(x, w, b))
    assert x_saved.shape == (34, 24) and index.shape == (34,)  # k = ceil(0.3 * 111)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    grad_2d = grad_out.reshape(-1, 10)
    torch.testing.assert_close(
        w.grad, kernels.sampled_weight_grad_reference(grad_2d, index, x_saved), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad, grad_out @ w.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, grad_2d.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(INTERPRETING or not kernels.TRITON_AVAILABLE, reason="this is the launcher")
def test_interpreter_suite():
    env = dict(os.environ, TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "interpreter"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.skipif(INTERPRETING, reason="opcheck runs the CPU reference path")
def test_kernel_ops_pass_opcheck():
    x = torch.randn(37, 29)
    index = torch.randint(0, 37, (11,))
    scale = torch.rand(11)
    torch.library.opcheck(torch.ops.wtacompile.row_norms.default, (x,))
    torch.library.opcheck(torch.ops.wtacompile.gather_scale.default, (x, index, scale))
    torch.library.opcheck(
        torch.ops.wtacompile.sampled_weight_grad.default, (torch.randn(37, 5), index, torch.randn(11, 29))
    )
