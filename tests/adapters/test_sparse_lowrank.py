"""The sparse low-rank kernel (``router.SparseLowRank``) against the naive per-sample formula, forward and
gradients of every input, in both layouts, in place and not, with "no update" rows."""

import pytest
import torch

from difflora.adapters.router import SparseLowRank

# One tolerance for the forward and every gradient (float64: only the order of the sums differs).
TOL = 1e-10


def _naive(out, x, down, up_t, s, tokens_last):
    """``out_n + up_n (s_n * (down_n x_n))`` sample by sample, with the weight of each sample built whole."""
    rows = []
    for n in range(x.shape[0]):
        w = up_t[n].t() @ (s[n][:, None] * down[n])  # (D, F): this sample's whole update
        rows.append(out[n] + (x[n] @ w.t() if tokens_last else w @ x[n]))
    return torch.stack(rows)


@pytest.mark.parametrize("tokens_last", [False, True])
@pytest.mark.parametrize("inplace", [True, False])
def test_kernel_equals_the_naive_formula_forward_and_gradients(tokens_last, inplace):
    g = torch.Generator().manual_seed(0)
    n, f, d, r, length = 5, 6, 7, 4, 3

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    out0, x = (
        leaf(n, length, d) if tokens_last else leaf(n, d, length),
        leaf(n, length, f) if tokens_last else leaf(n, f, length),
    )
    down, up_t, s = leaf(n, r, f), leaf(n, r, d), leaf(n, r)
    with torch.no_grad():
        s[1] = 0  # a "no update" row
    leaves = [out0, x, down, up_t, s]
    # out0 * 1: a non-leaf, as a layer's output is (an in-place op on a leaf that needs grad is refused).
    got = SparseLowRank.apply(out0 * 1, x, down, up_t, s, tokens_last, inplace)
    want = _naive(out0, x, down, up_t, s, tokens_last)
    torch.testing.assert_close(got, want, rtol=TOL, atol=TOL)
    assert torch.equal(got[1], out0[1])  # the "no update" row is the base output, bit for bit
    grad_out = torch.randn(got.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(got, leaves, grad_out)
    want_grads = torch.autograd.grad(want, leaves, grad_out)
    for name, a, b in zip(["out", "x", "down", "up_t", "s"], grads, want_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL, msg=f"gradient of {name}")
        assert a.abs().sum() > 0, name
