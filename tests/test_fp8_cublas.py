"""fp8_cublas on the CPU: the engine switch, which devices and shapes may take cuBLAS's block-scaled FP8 GEMM,
and that its one-time check tells a correctly read scale layout from a wrong one (torch._scaled_mm's block
scaling runs on sm_90 only: there the GPU tests run the real thing)."""
import pytest
import torch

from fusedtune.ops import fp8_cublas
from fusedtune.reference import fp8 as ref


def test_engine_switch(monkeypatch):
    monkeypatch.delenv(fp8_cublas.ENGINE_ENV, raising=False)
    assert fp8_cublas.engine() == "auto"
    monkeypatch.setenv(fp8_cublas.ENGINE_ENV, "triton")
    assert fp8_cublas.engine() == "triton" and not fp8_cublas.usable("cpu", 512, 512, 512, 128, torch.bfloat16)
    monkeypatch.setenv(fp8_cublas.ENGINE_ENV, "fast")
    with pytest.raises(ValueError, match="auto, triton, cublas"):
        fp8_cublas.engine()
    monkeypatch.setenv(fp8_cublas.ENGINE_ENV, "cublas")
    with pytest.raises(RuntimeError, match="not a CUDA device"):     # forced where it cannot run: an error
        fp8_cublas.usable("cpu", 512, 512, 512, 128, torch.bfloat16)
    monkeypatch.setenv(fp8_cublas.ENGINE_ENV, "auto")
    assert not fp8_cublas.usable("cpu", 512, 512, 512, 128, torch.bfloat16)   # auto: quietly the Triton kernel


def test_shape_rules():
    gap = fp8_cublas.shape_gap
    assert gap(1000, 4096, 4096, 128, torch.bfloat16) is None           # rows: a multiple of 4
    assert gap(8, 4096, 4096, 128, torch.float32) is None
    for m in (1, 2, 17, 1001):                                           # CUBLAS_STATUS_NOT_SUPPORTED on an H200
        assert "not a multiple of 4" in gap(m, 4096, 4096, 128, torch.bfloat16)
    assert "multiple of 512" in gap(64, 4096, 4224, 128, torch.bfloat16)   # 33 K blocks: cuBLAS pads them
    assert gap(64, 4096, 4224, 1, torch.bfloat16) is None                  # 1x128 x 1x128: 128 is enough
    assert "multiple of 128" in gap(64, 4096, 1000, 1, torch.bfloat16)
    assert "multiple of 16" in gap(64, 4100, 4096, 128, torch.bfloat16)
    assert "float16" in gap(64, 4096, 4096, 128, torch.float16)
    assert gap(0, 4096, 4096, 128, torch.bfloat16) == "no rows"


def _emulated_scaled_mm(transpose_b_scales: bool):
    """What cuBLAS computes from _call's arguments if it reads the scales as torch's tests lay them out
    (A's [M, KB] outer-dim-major, B's passed [KB, N or NB]), or, with transpose_b_scales, misreads B's."""
    def fake(a_q, b_t, scale_a, scale_b, out_dtype, use_fast_accum):
        assert scale_a.stride(0) == 1 and not use_fast_accum
        b_q = b_t.t()
        sb = scale_b.t()                              # back to [N or NB, KB]
        if transpose_b_scales:
            sb = scale_b.contiguous().view(sb.shape)  # the same numbers taken in the other order
        rows = 1 if sb.shape[0] == b_q.shape[0] else ref.TILE
        return ref.gemm(a_q, scale_a, b_q, sb, rows, torch.float32).to(out_dtype)
    return fake


@pytest.mark.parametrize("b_rows", [1, 128])
def test_check_tells_a_right_layout_from_a_wrong_one(b_rows, monkeypatch):
    monkeypatch.setattr(fp8_cublas, "device_gap", lambda d: None)
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm(False))
    assert fp8_cublas._check(torch.device("cpu"), b_rows, torch.bfloat16) is None
    monkeypatch.setattr(torch, "_scaled_mm", _emulated_scaled_mm(True))
    why = fp8_cublas._check(torch.device("cpu"), b_rows, torch.bfloat16)
    assert why is not None and "disagreed" in why

    def broken(*a, **k):
        raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")
    monkeypatch.setattr(torch, "_scaled_mm", broken)
    assert "CUBLAS_STATUS_NOT_SUPPORTED" in fp8_cublas._check(torch.device("cpu"), b_rows, torch.float32)


def test_gemm_passes_the_layouts_of_torchs_block_scaling(monkeypatch):
    """_call's scale tensors: A's [M, K/128] with stride (1, M); B's [K/128, N] row-major (1x128) or
    [K/128, N/128] with stride (1, K/128) (128x128); B itself the K-major [N, K] seen as [K, N] column-major."""
    seen = {}

    def record(a_q, b_t, scale_a, scale_b, out_dtype, use_fast_accum):
        seen.update(a=(tuple(scale_a.shape), scale_a.stride()), b=(tuple(scale_b.shape), scale_b.stride()),
                    mat2=b_t.stride())
        return torch.zeros(a_q.shape[0], b_t.shape[1], dtype=out_dtype)
    monkeypatch.setattr(torch, "_scaled_mm", record)
    M, N, K = 256, 384, 1024
    a_q = torch.zeros(M, K, dtype=torch.float8_e4m3fn)
    b_q = torch.zeros(N, K, dtype=torch.float8_e4m3fn)
    fp8_cublas.gemm(a_q, torch.ones(M, 8), b_q, torch.ones(3, 8), 128, torch.bfloat16)
    assert seen == {"a": ((M, 8), (1, M)), "b": ((8, 3), (1, 8)), "mat2": (1, K)}
    fp8_cublas.gemm(a_q, torch.ones(M, 8), b_q, torch.ones(N, 8), 1, torch.float32)
    assert seen == {"a": ((M, 8), (1, M)), "b": ((8, N), (N, 1)), "mat2": (1, K)}
