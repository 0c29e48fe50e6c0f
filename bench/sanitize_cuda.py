"""Every CUDA kernel of fusedtune._C once, on small inputs, for compute-sanitizer (gpu_check.sh runs it
under racecheck and memcheck). Each call is also checked against the CPU kernel bit for bit (the
tensor-core Hadamard within one ulp), so a run that the sanitizer passes still fails on a wrong result.

    compute-sanitizer --tool racecheck python bench/sanitize_cuda.py
"""
import sys

import torch

from fusedtune import _ext
from fusedtune.ops import fp8, hft, roste, sparse_delta, zo
from fusedtune.testing import assert_same_bits


def both(fn):
    """fn(device) on cuda and on cpu; the results must agree bit for bit."""
    got = fn("cuda")
    torch.cuda.synchronize()
    assert_same_bits([t.cpu() for t in got], fn("cpu"), fn.__name__)
    print(f"sanitize_cuda: {fn.__name__} ok", flush=True)


def _inputs(dev, *shapes_dtypes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dt).to(dev) for s, dt in shapes_dtypes]


def sddmm_tiles(dev):
    dy, x = _inputs(dev, ((300, 150), torch.bfloat16), ((300, 90), torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(150 * 90, generator=g)[:2000].sort().values.to(torch.int32).to(dev)
    # ragged tiles, several splits, batches smaller than a tile's items; then one tile, one split
    return [torch.ops.fusedtune.sddmm_kernel(dy, x, idx, [64, 32, 3, 300, 112]),
            torch.ops.fusedtune.sddmm_kernel(dy.float(), x.float(), idx, [256, 128, 1, 4096, 304])]


def hadamard(dev):
    # warp kernel (cp.async staging): bf16 and fp32 (64 KB of shared memory) at 4096, fp16 at 512, rows
    # that leave a block's warps idle; block kernel: fp32 with a factor (and H_12^T, the backward's), bf16 at
    # 8192 (grouped loads) and at 14336 = 28 x 512 (factor items over 448 threads)
    # (and rows beyond the resident warps / blocks: the persistent grids' next-row copies)
    ins = _inputs(dev, ((8, 4096), torch.bfloat16), ((8, 12 * 256), torch.float32), ((5, 4096), torch.float32),
                  ((3, 512), torch.float16), ((3, 8192), torch.bfloat16), ((3, 28 * 512), torch.bfloat16),
                  ((2000, 4096), torch.bfloat16), ((600, 3584), torch.bfloat16))
    b = "cuda" if dev == "cuda" else "cpu"
    return [roste.hadamard(x, backend=b) for x in ins] + [roste.hadamard(ins[1], transpose=True, backend=b)]


def hadamard_mma():
    """The tensor-core factor kernel (roste_mma.cu): its sums are the tensor core's, so it is checked against
    the float64 reference rounded to the row's dtype within one unit in the last place (it is fp32-accurate
    before its one rounding), not bit for bit. Rows beyond the resident blocks, p = 32 / 64 / 128 / 512 / 1024,
    a warp holding all of H_m's row tiles (28, 40, 12, 44) and one a tile (76, 172), H_m^T."""
    from fusedtune.reference import hadamard as href
    ins = _inputs("cuda", ((700, 28 * 512), torch.bfloat16), ((5, 40 * 32), torch.float16),
                  ((40, 12 * 1024), torch.bfloat16), ((9, 44 * 128), torch.float16), ((300, 172 * 64), torch.bfloat16),
                  ((7, 76 * 64), torch.float16), seed=8)
    assert not any(roste.mma_refuses(x) for x in ins), [roste.mma_refuses(x) for x in ins]
    cases = [(x, False) for x in ins] + [(ins[3], True), (ins[4], True)]
    with roste.mma_scope(True):
        got = [roste.hadamard(x, transpose=tr, backend="cuda") for x, tr in cases]
    torch.cuda.synchronize()
    for i, ((x, tr), g) in enumerate(zip(cases, got)):
        w = href.hadamard(x.double().cpu(), transpose=tr).to(x.dtype).float()
        g = g.cpu().float()
        ulp = torch.finfo(x.dtype).eps * torch.maximum(g.abs(), w.abs())
        tiny = 2.0 ** -16 * w.abs().amax(dim=1, keepdim=True)   # outputs near 0: the fp32 sums' own error
        assert ((g - w).abs() <= ulp + tiny).all(), f"hadamard_mma: output {i} differs by more than one ulp"
    print("sanitize_cuda: hadamard_mma ok", flush=True)


def zo_apply(dev):
    # the generic call, then MeZO's one-seed calls (MODE_ONE, MODE_SAME) over whole chunks of every dtype
    # (the prefetching loop) and partial last chunks
    ts = _inputs(dev, ((1000, 33), torch.bfloat16), ((4097,), torch.float32), ((5,), torch.float16),
                 ((2, 32768 + 7), torch.float32), ((3, 32768), torch.float16))
    b = "cuda" if dev == "cuda" else "cpu"
    zo.zo_apply_(ts, [3, 4], [1e-3, -2e-3], backend=b)
    zo.zo_apply_(ts, [5], [1e-3], backend=b)
    zo.zo_apply_(ts, [5], [-2e-3], undo=([5], [1e-3]), backend=b)
    return ts


def fp8_quant(dev):
    # both quantizers with their copies (the swizzled shared-memory transpose) over partial tiles of each
    # dtype, and the 1x128 one without its copy
    ins = _inputs(dev, ((136, 264), torch.bfloat16), ((40, 128), torch.float32), ((8, 200), torch.float16), seed=7)
    b = "cuda" if dev == "cuda" else "cpu"
    out = []
    for x in ins:
        out += list(fp8.fp8_quantize_1x128(x, backend=b)) + list(fp8.fp8_quantize_128x128(x, True, b, transpose=True))
    out += list(fp8.fp8_quantize_1x128(ins[0], transpose=False, backend=b))[:2]
    return [t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t for t in out]


def adamw(dev):
    b = "cuda" if dev == "cuda" else "cpu"
    ps = _inputs(dev, ((100, 33), torch.float32), ((40, 33), torch.bfloat16), seed=2)
    gs = _inputs(dev, ((100, 33), torch.float32), ((40, 33), torch.bfloat16), seed=3)
    ms, vs = [torch.zeros(p.shape, device=dev) for p in ps], [torch.zeros(p.shape, device=dev) for p in ps]
    tg = [torch.empty(0, device=dev), torch.zeros(90, 33, device=dev).bfloat16()]
    rows = [torch.empty(0, dtype=torch.long, device=dev), (torch.arange(40) * 2).to(dev)]
    hft.masked_adamw_(ps, gs, ms, vs, tg, rows, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                      step=1, backend=b)
    w = _inputs(dev, ((60, 70), torch.bfloat16), seed=4)[0]
    idx = torch.randperm(4200, generator=torch.Generator().manual_seed(5))[:300].sort().values.to(torch.int32).to(dev)
    vals, grads = _inputs(dev, ((300,), torch.float32), ((300,), torch.float32), seed=6)
    m, v = torch.zeros(300, device=dev), torch.zeros(300, device=dev)
    base = w.view(-1)[idx.long()].clone()
    sparse_delta.sparse_adamw_([vals], [grads], [m], [v], [w], [base], [idx], lr=1e-2, beta1=0.9, beta2=0.999,
                               eps=1e-8, weight_decay=0.1, step=1, backend=b)
    return ps + ms + vs + tg + [vals, m, v, w]


if __name__ == "__main__":
    if not (torch.cuda.is_available() and _ext.with_cuda()):
        sys.exit("sanitize_cuda: needs a GPU and fusedtune._C built with CUDA kernels")
    hadamard_mma()   # the newest first: racecheck may run out of time
    for fn in (fp8_quant, sddmm_tiles, hadamard, zo_apply, adamw):
        both(fn)
    print("sanitize_cuda: all kernels ran and matched the CPU kernels")
