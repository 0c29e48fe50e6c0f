"""RoSTE family benchmark (python -m fusedtune bench roste).

At hidden / intermediate sizes n in {4096, 11008, 14336, 18944} (Llama-2/3, Mistral, Qwen2.5) over
M = 8192 bf16 rows (--quick: 4096 rows), same run:
1. hadamard (orthonormal; the CUDA butterfly kernel where it serves and the Triton kernel) against a
   memcpy of the same bytes (copy_ into a preallocated tensor). Goal on an H100: <= 1.15x the memcpy
   time up to n = 16384. The opt-in tensor-core factor kernel for 16-bit factored rows ("cuda-mma",
   FUSEDTUNE_HADAMARD_MMA) is timed in sections of its own after all the others.
2. rotate_fake_quant (per token, W4 asymmetric, clip 0.95; one launch: rotation, min/max, quantization)
   against the unfused sequence (the Hadamard that auto runs -- CUDA's with the extension --, then RoSTE's
   fake quantization as torch ops: min/max, scale, round, clamp, dequantize). Goal on an H100: >= 2x
   faster than unfused.
3. float32 rows (fp32 master weights, fp32 activations) at n in {4096, 11008}, 4096 rows: the Triton
   Hadamard (three fp16 parts per operand) against a memcpy of the same bytes, and the fused per-token
   rotate + W4 fake quant against the reference backend, which float32 rows ran on the GPU before.
   No goal in the issue (its goals are for 16-bit rows).
   Also (GPU) the Hadamard rows alone at 4096 x {3584, 5120, 10240, 12288}, sizes with a factor that the CUDA
   block kernel serves: CUDA against Triton where both serve (ops/roste.py _prefer_triton: which auto takes).
4. an exported layer (W4A8, rotated, 4096 x 4096 at 4096 tokens) on the integer GEMM (rotation,
   activation codes, int8 tensor-core GEMM with in-tile 4-bit unpacking) against its fake-quant path and
   the bf16 nn.Linear. No goal in the issue; the speed-up over bf16 is what the export is for.
The roofline column counts the HBM bytes (one read, one write) and, for Triton, the padded tensor-core
flops of the two GEMMs per row (python/fusedtune/triton_kernels/roste.py), whichever bounds.
Before timing, the fused rotate + fake quant runs once against the unfused sequence (and, float32 rows, against
the reference backend), and the exported layer's integer GEMM against its fake-quant path; the rows' notes say
how far apart they are (core.agreement; "RESULTS DIFFER" where they do). The fake-quant outputs are compared
with a tolerance of 1.5 quantization levels of a token (a rotation rounded differently can move a value across
a rounding boundary, one level); the exported layer with the default (bf16 rounding). The Hadamard against a
memcpy (the same bytes, not the same result) and the exported layer against the unquantized nn.Linear (4-bit
weights differ from it by design) are not checked.

--cpu: tiny shapes on the reference backend; the rows check the framework, not performance.
"""
from __future__ import annotations

import torch

from .core import agreement, linear_host_rows, opt_in_skipped, roofline_pct, row

SIZES = (4096, 11008, 14336, 18944)
# hidden sizes of Qwen2.5-7B (28 x 128), Llama-2-13B (40 x 128), 10240 (40 x 256) and 12288 (12 x 1024): both kernels
# serve them; auto's cut between CUDA and Triton (ops/roste.py _prefer_triton, 8192) lies between 5120 and 14336
FACTORED = (3584, 5120, 10240, 12288)
TINY = ((64, 768),)
GOAL_MEMCPY = 1.15
GOAL_FUSED = 2.0
CPU_NOTE = "CPU framework check, not performance"


def _flops(rows: int, n: int, parts: int = 1) -> float:
    """Tensor-core flops of the Triton Hadamard: H_A (padded to AP) times X [A, P], then two GEMMs with
    H_P (the hi and lo parts); parts=3 for float32 rows (three fp16 parts of each operand)."""
    import triton

    from ..triton_kernels.roste import plan
    A, P = plan(n)
    AP = max(16, triton.next_power_of_2(A))
    return rows * parts * (2.0 * AP * AP * P + (2.0 if parts == 3 else 4.0) * AP * P * P)


def _quant_agreement(ours, theirs, bits: int) -> str:
    """agreement() of two fake-quantized outputs, to within 1.5 quantization levels: a token's level (its
    clipped range / (2^bits - 1)) is at most 2 / (2^bits - 1) of the output's largest magnitude, and a rotation
    rounded differently (another kernel's sums) moves the rare value sitting on a rounding boundary by one level."""
    level = 2 / (2 ** bits - 1)
    return agreement(ours, theirs, tol=1.5 * level, why=f"1.5 levels of {bits}-bit per-token quantization: a value "
                     "on a rounding boundary may round either way")


def _unfused(x, bits, clip):
    """The unfused sequence: the Hadamard that auto runs for x (per shape: CUDA's butterfly kernel or Triton's;
    not the opt-in tensor-core kernel, timed in its own sections), then torch's fake quant, without the clip
    mask (ours is timed with the identity STE, which makes none)."""
    from ..ops.roste import hadamard, mma_scope
    from ..reference.roste import fake_quant

    def f():
        with mma_scope(False):
            y = hadamard(x)
        return fake_quant(y, bits, "token", False, clip, mask=False)[0].to(x.dtype)
    return f


def _hadamard_backends(x, on_gpu: bool, mma_only: bool = False) -> list[str]:
    """The backends whose Hadamard kernel serves x: the CUDA butterfly kernel, the tensor-core factor kernel
    ("cuda-mma", 16-bit factored rows) and Triton on a GPU, the C++ kernel (or the reference without the
    extension) on the CPU. The opt-in "cuda-mma" kernel is timed apart (mma_only), in sections of its own
    after the others: a fault of a kernel new to a GPU leaves the process's CUDA context unusable, and the
    default schedule's rows are then already written."""
    from .. import backend as B
    from ..ops.roste import _HAD_HAS, _ext_refuses, mma_refuses
    has = frozenset(_HAD_HAS)
    if not on_gpu:
        return ["cpu" if B.can_serve("cpu", x.device, has)[0] and not _ext_refuses(x) else "reference"]
    ext = B.can_serve("cuda", x.device, has)[0]
    if mma_only:
        return ["cuda-mma"] if ext and not mma_refuses(x) and not opt_in_skipped("cuda-mma") else []
    return (["cuda"] if ext and not _ext_refuses(x) else []) + (["triton"] if B.can_serve("triton", x.device, has)[0]
                                                                 else [])


def _timed_hadamard(timer, x, hb: str):
    """hadamard(x) on backend hb ("cuda-mma": backend cuda with the tensor-core kernel on; "cuda": off)."""
    from ..ops.roste import hadamard, mma_scope
    backend = "cuda" if hb.startswith("cuda") else hb
    with mma_scope(hb == "cuda-mma"):
        return timer(lambda: hadamard(x, backend=backend))


def size_rows(timer, m: int, n: int, on_gpu: bool, fused: bool = True, mma_only: bool = False) -> list[dict]:
    """The rows of one shape (fused=False: the Hadamard rows alone; mma_only: the opt-in tensor-core
    kernel's Hadamard row alone)."""
    from ..ops.roste import rotate_fake_quant
    device = "cuda" if on_gpu else "cpu"
    dt = torch.bfloat16 if on_gpu else torch.float32
    backend = "triton" if on_gpu else "reference"
    x = torch.randn(m, n, device=device, generator=torch.Generator(device=device).manual_seed(n)).to(dt)
    out = torch.empty_like(x)
    shape = f"{m}x{n}"
    moved = 2 * x.numel() * x.element_size()
    flops = _flops(m, n) if on_gpu else 0.0
    rows = []

    cp = timer(lambda: out.copy_(x))
    if mma_only and opt_in_skipped("cuda-mma"):
        return [row("hadamard (orthonormal)", shape, str(dt)[6:], "cuda-mma", "memcpy (copy_ of the same bytes)",
                    (float("nan"),) * 3, cp[0], note="skipped: " + opt_in_skipped("cuda-mma"))]
    for hb in _hadamard_backends(x, on_gpu, mma_only):
        try:
            had = _timed_hadamard(timer, x, hb)
        except Exception as e:  # noqa: BLE001 - the opt-in kernel failing is a row, not the loss of the section
            if hb != "cuda-mma":
                raise
            rows.append(row("hadamard (orthonormal)", shape, str(dt)[6:], hb, "memcpy (copy_ of the same bytes)",
                            (float("nan"),) * 3, cp[0], note=f"skipped: the tensor-core kernel failed "
                                                             f"({type(e).__name__}: {e})"))
            continue
        slow = had[0] / cp[0]
        note = CPU_NOTE if not on_gpu else (
            f"{slow:.2f}x memcpy; goal <= {GOAL_MEMCPY}x up to 16384: {'met' if slow <= GOAL_MEMCPY else 'NOT met'}"
            if n <= 16384 else f"{slow:.2f}x memcpy (above 16384: no goal)")
        rows.append(row("hadamard (orthonormal)", shape, str(dt)[6:], hb, "memcpy (copy_ of the same bytes)", had,
                        cp[0], roofline_pct(had[0], moved, flops if hb == "triton" else 0.0), note=note))

    if not fused or mma_only:
        return rows
    bits, clip = 4, 0.95
    check = _quant_agreement(rotate_fake_quant(x, bits, "token", False, clip, rotate=True, backend=backend),
                             _unfused(x, bits, clip)(), bits)     # once each, before timing
    fused = timer(lambda: rotate_fake_quant(x, bits, "token", False, clip, rotate=True, backend=backend))
    unf = timer(_unfused(x, bits, clip))
    from ..ops.roste import hadamard_choice, mma_scope
    with mma_scope(False):
        unf_had = hadamard_choice(x)
    speed = unf[0] / fused[0]
    note = CPU_NOTE if not on_gpu else (f"{speed:.2f}x unfused; goal >= {GOAL_FUSED}x: "
                                        f"{'met' if speed >= GOAL_FUSED else 'NOT met'}")
    rows.append(row("rotate_fake_quant (token, W4 asym, fused)", shape, str(dt)[6:], backend,
                    f"hadamard ({unf_had}) + torch fake quant (unfused)", fused, unf[0],
                    roofline_pct(fused[0], moved, flops), note=f"{note}; {check}"))
    return rows


def fp32_rows(timer, m: int, n: int) -> list[dict]:
    """float32 rows on the GPU: the Triton Hadamard vs memcpy, the fused rotate + quant vs the reference
    (on the timer's device: the CPU under TRITON_INTERPRET=1 checks the framework)."""
    from ..ops.roste import hadamard, rotate_fake_quant
    dev = timer.device
    x = torch.randn(m, n, device=dev, generator=torch.Generator(device=dev).manual_seed(n))
    out = torch.empty_like(x)
    shape, moved, flops = f"{m}x{n}", 2 * x.numel() * 4, _flops(m, n, parts=3)
    cp = timer(lambda: out.copy_(x))
    had = timer(lambda: hadamard(x, backend="triton"))
    rows = [row("hadamard (orthonormal), float32 rows", shape, "float32", "triton", "memcpy (copy_ of the same bytes)",
                had, cp[0], roofline_pct(had[0], moved, flops), note=f"{had[0] / cp[0]:.2f}x memcpy; three fp16 "
                "parts per operand (6 GEMMs a row); no goal for float32 in the issue")]
    check = _quant_agreement(rotate_fake_quant(x, 4, "token", False, 0.95, rotate=True, backend="triton"),
                             rotate_fake_quant(x, 4, "token", False, 0.95, rotate=True, backend="reference"), 4)
    fused = timer(lambda: rotate_fake_quant(x, 4, "token", False, 0.95, rotate=True, backend="triton"))
    ref = timer(lambda: rotate_fake_quant(x, 4, "token", False, 0.95, rotate=True, backend="reference"))
    rows.append(row("rotate_fake_quant (token, W4 asym, fused), float32 rows", shape, "float32", "triton",
                    "reference backend (float64 rotation: what float32 rows ran on the GPU before)", fused, ref[0],
                    roofline_pct(fused[0], moved, flops), note=f"{ref[0] / fused[0]:.3g}x the reference; {check}"))
    return rows


def export_rows(timer, m: int, n: int, on_gpu: bool) -> list[dict]:
    """An exported layer (fusedtune.roste.QuantizedLinear, W4A8, rotated, n x n) on the integer GEMM
    against the same layer's fake-quant path and the bf16 nn.Linear it came from."""
    from ..nn import RoSTELinear
    from ..roste.export import QuantizedLinear
    device = "cuda" if on_gpu else "cpu"
    dt = torch.bfloat16 if on_gpu else torch.float32
    lin = torch.nn.Linear(n, n, bias=False, device=device, dtype=dt)
    layer = RoSTELinear.from_linear(lin, w_bits=4, a_bits=8, rotate=True)
    qi, qf = QuantizedLinear.from_roste(layer, "integer"), QuantizedLinear.from_roste(layer, "fake")
    x = torch.randn(m, n, device=device, dtype=dt)
    shape, rows = f"M={m} K=N={n}", []
    with torch.no_grad():
        check = agreement(qi(x), qf(x))     # once each, before timing (the unquantized nn.Linear: not the same result)
        ours = timer(lambda: qi(x))
        # int8 tensor cores peak at the fp8 figure (1979 TOPS dense); bytes: x, 4-bit W, y
        rl = roofline_pct(ours[0], m * n * 4 + n * n / 2, 2.0 * m * n * n, "fp8") if on_gpu else float("nan")
        for base, name, agree in ((lambda: qf(x), "the same layer, fake quant (dequantized weight, bf16 GEMM)", check),
                                  (lambda: lin(x), "bf16 nn.Linear (unquantized)", "")):
            b = timer(base)
            note = CPU_NOTE if not on_gpu else "rotation + activation codes + int8 GEMM"
            rows.append(row("exported layer (W4A8, rotated), integer GEMM", shape, str(dt)[6:],
                            "triton" if on_gpu else "reference", name, ours, b[0], rl,
                            note=note + (f"; {agree}" if agree else "")))
    return rows


def _factor(n: int) -> int:
    from ..reference import hadamard as href
    return href.split_size(n)[0]


def sections(timer, quick: bool) -> list:
    on_gpu = timer.name != "cpu"
    shapes = [(4096 if quick else 8192, n) for n in SIZES] if on_gpu else list(TINY)
    out = [(f"Hadamard and rotate+quant at {m}x{n}", lambda m=m, n=n: size_rows(timer, m, n, on_gpu))
           for m, n in shapes]
    if on_gpu:
        out += [(f"Hadamard at 4096x{n} (factor {_factor(n)}: CUDA block kernel or Triton under auto)",
                 lambda n=n: size_rows(timer, 4096, n, on_gpu, fused=False)) for n in FACTORED]
        out += [(f"float32 rows at 4096x{n}", lambda n=n: fp32_rows(timer, 4096, n)) for n in (4096, 11008)]
    out += [("integer GEMM export", lambda: export_rows(timer, *((4096, 4096) if on_gpu else (64, 256)), on_gpu)),
            ("host time per call", lambda: _host(on_gpu, quick))]
    if on_gpu:   # last (_hadamard_backends): the opt-in tensor-core kernel
        out += [(f"Hadamard at {m}x{n}, opt-in tensor-core kernel (cuda-mma)",
                 lambda m=m, n=n: size_rows(timer, m, n, on_gpu, fused=False, mma_only=True))
                for m, n in shapes + [(4096, n) for n in FACTORED]]
    return out


def _host(on_gpu, quick):
    from ..nn import RoSTELinear  # noqa: PLC0415
    return linear_host_rows("RoSTELinear", RoSTELinear.from_linear, on_gpu, quick)
