"""Inputs and comparisons shared by the FP8 quantizer tests (CPU kernel, CUDA kernel)."""
import torch


def same(a, b) -> bool:
    """Bytes equal, NaN bytes compared as NaN (torch writes 0x7F or 0xFF); scales with NaN as NaN."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype == torch.float8_e4m3fn:
        na, nb = torch.isnan(a.float()), torch.isnan(b.float())
        return torch.equal(na, nb) and torch.equal(a.view(torch.uint8)[~na], b.view(torch.uint8)[~nb])
    return torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0))


def identical(a, b) -> bool:
    """The same bytes, NaNs included (the CPU and CUDA kernels write the canonical NaN byte 0x7F)."""
    return (a.shape == b.shape and a.dtype == b.dtype
            and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def edge_input(M: int, K: int, dtype, device="cpu", seed=0) -> torch.Tensor:
    """Random values over seven decades along K, plus (where the shape has room) an inf, a NaN, a -NaN (in tiles of
    its own, on shapes over 130 x 130), an all-zero
    row, tiles whose amax / 448 underflows float32 (2^-145) or is subnormal (2^-140), tiny values and -0."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.logspace(-4, 3, K)[None, :]
    x[0, : min(3, K)] = torch.tensor([1e-9, -3e-5, -0.0])[: min(3, K)]
    if M > 4 and K > 8:
        x[1, 7] = float("inf")
        x[2, K - 1] = float("nan")
        x[3, :] = 0.0
        x[4] = 0.0
        x[4, 1] = 2.0 ** -145
        x[4, K - 1] = 2.0 ** -140
    if M > 130 and K > 130:
        x[129:, 129] = -float("inf")        # a whole column of one column-wise tile
        x[M - 1, 0] = -float("nan")         # tiles of its own: row-wise, column-wise and 128x128
    return x.to(device=device, dtype=dtype)


def near_boundaries(seed: int, rows: int = 512) -> torch.Tensor:
    """float32 [rows, 128]: column 0 each row's amax (random over 60 decades: the row's scale), the rest E4M3
    values and rounding midpoints (the subnormal range included) times the scale, moved by -4..4 fp32 ulps,
    random signs. x * RN(1/s) and fl(x / s) round to different E4M3 bytes on about 900 of its elements."""
    g = torch.Generator().manual_seed(seed)
    amax = (torch.rand(rows, generator=g) + 0.5) * torch.pow(10.0, torch.randint(-30, 30, (rows,), generator=g).float())
    s = amax / 448.0
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = torch.cat([vals, (vals[1:] + vals[:-1]) / 2])
    pick = grid[torch.randint(0, len(grid), (rows, 127), generator=g)]
    bits = (pick * s[:, None]).float().view(torch.int32) + torch.randint(-4, 5, pick.shape, generator=g,
                                                                          dtype=torch.int32)
    x = bits.clamp_(min=0).view(torch.float32)                      # (magnitudes: 0 stays 0 or subnormal)
    x = torch.minimum(x, amax[:, None]) * torch.where(torch.rand(x.shape, generator=g) < 0.5, -1.0, 1.0)
    x = torch.cat([amax[:, None], x], 1)
    assert torch.isfinite(x).all()
    return x


def e4m3_edges() -> torch.Tensor:
    """float32 rows of 128 whose amax is 448 (scale 1: a quantizer casts the values themselves): every E4M3
    value, the midpoints between neighbours (ties to even), values just above and below them, saturation
    and subnormals, both signs."""
    vals = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = (vals[1:] + vals[:-1]) / 2
    near = torch.cat([vals, mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20),
                      torch.tensor([448., 447.9, 2 ** -10, 2 ** -9 * 1.5, 2 ** -9 * 2.5, 1e-30])])
    x = torch.cat([near, -near]).reshape(1, -1)
    x = torch.cat([x, torch.zeros(1, (-x.shape[1]) % 128)], 1).reshape(-1, 128)
    x[:, 0] = 448.0
    return x


def linear_by_backend(M: int, K: int, N: int, backends=("triton", "reference")) -> dict:
    """{backend: (y, dX, dW)} of fp8_linear forward+backward on one seeded x [M, K], W [N, K] and dy, per backend."""
    from fusedtune.ops import fp8 as F8
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4))
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(5)) * 0.05
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(6))
    res = {}
    for be in backends:
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = F8.fp8_linear(xi, wi, backend=be)
        y.backward(dy)
        res[be] = (y, xi.grad, wi.grad)
    return res
