"""Triton zo kernel in the interpreter (TRITON_INTERPRET=1 pytest -m interp): bit-identical to the
reference on CPU tensors."""
import pytest
import torch

from fusedtune.ops import zo_apply_, zo_noise
from fusedtune.testing import check_backends

pytestmark = pytest.mark.interp

CASES = [
    dict(seeds=[3], coeffs=[1e-3]),
    dict(seeds=[1, (1 << 64) - 1], coeffs=[1e-3, -0.5], noise="rademacher", tensor_ids=[5, (1 << 32) - 1]),
    dict(seeds=[9, 10], coeffs=[-1e-6, 1e-3], undo=([9, 4], [-1e-3, 2e-3]), alpha=0.999),
    dict(seeds=[5], coeffs=[3e-3], rounding="stochastic", rounding_seed=-7, undo=([6], [1e-3])),
    dict(seeds=[5, 8], coeffs=[3e-3, 1e-3], undo=([5], [-1e-3])),      # a folded MeZO's last pass
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_triton_matches_reference(dtype, case):
    kw = dict(CASES[case])

    def run(b):
        g = torch.Generator().manual_seed(1)
        ts = [(torch.randn(s, generator=g) * 0.05).to(dtype) for s in [(1,), (1031,), (3, 77)]][: len(kw.get("tensor_ids", [0, 1, 2]))]
        zo_apply_(ts, backend=b, **kw)
        return ts
    assert "triton" in check_backends(run, "cpu", exact=True)


def test_triton_noise_matches_reference():
    for noise in ("normal", "rademacher"):
        a = zo_noise((4099,), seed=(1 << 63) + 1, tensor_id=3, noise=noise, backend="triton")
        b = zo_noise((4099,), seed=(1 << 63) + 1, tensor_id=3, noise=noise, backend="reference")
        assert torch.equal(a, b)


def test_triton_float16_stochastic_rounding_edges():
    from test_zo_apply import fp16_edge_values
    for coeff in (1e-7, 3e-5, 40.0):
        def run(b):
            t = fp16_edge_values()
            zo_apply_(t, [11], [coeff], rounding="stochastic", rounding_seed=5, backend=b)
            return [t]
        assert "triton" in check_backends(run, "cpu", exact=True)


@pytest.mark.parametrize("rs", [5, -7, 2**31, 2**32 - 1, -(2**31) - 1, 2**40 + 3, 2**63 + 12345])
def test_triton_rounding_seed_of_any_64_bit_value(rs):
    """The seed reaches the kernel as two signed 32-bit arguments: Triton types a Python int by its
    value, and a u32-typed seed (2^31 <= s < 2^32) once lost its high word."""
    def run(b):
        t = (torch.randn(999, generator=torch.Generator().manual_seed(2)) * 0.05).bfloat16()
        zo_apply_(t, [3], [1e-4], rounding="stochastic", rounding_seed=rs, backend=b)
        return [t]
    assert "triton" in check_backends(run, "cpu", exact=True)


def test_triton_writes_are_seen_by_autograd():
    """The Triton kernel writes through pointers, which torch cannot see: the direct eager route bumps the
    tensors' version counters (as the op's dispatcher wrapper does), so autograd refuses a backward through
    a tensor saved before it was perturbed."""
    w = torch.randn(64, requires_grad=True)
    with torch.no_grad():
        p = w.clone()
    x = torch.randn(64, requires_grad=True)
    y = (x * p).sum()            # saves p for x's gradient
    v = p._version
    zo_apply_([p], [3], [1e-3], backend="triton")
    assert p._version > v
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
