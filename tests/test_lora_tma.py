"""Host side of the Hopper LoRA GEMM (triton_kernels/lora_tma.py) without a GPU: where it is taken, and the
allocator its device-made descriptors need."""
import threading

import pytest
import torch


def test_allocator_set_where_none_and_a_users_kept():
    """Triton's allocator is a context variable: a thread (the autograd engine's device thread runs the
    backward) starts without one. _ensure_allocator sets fusedtune's there, and leaves a user's alone."""
    import triton
    from triton.runtime import _allocation

    from fusedtune.triton_kernels import lora_tma
    seen = {}

    def fresh_thread():
        seen["before"] = _allocation._allocator.get()
        lora_tma._ensure_allocator()
        seen["after"] = _allocation._allocator.get()

        def mine(size, alignment, stream):
            return torch.empty(size, dtype=torch.int8)
        triton.set_allocator(mine)
        lora_tma._ensure_allocator()
        seen["kept"] = _allocation._allocator.get() is mine
    t = threading.Thread(target=fresh_thread)
    t.start()
    t.join()
    assert isinstance(seen["before"], _allocation.NullAllocator)
    assert seen["after"] is lora_tma._scratch and seen["kept"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the routing of a machine without a GPU")
def test_not_taken_off_a_hopper_gpu(monkeypatch):
    """Enabled, the kernel is still only taken on an sm_90 GPU (or in the interpreter): here, CPU tensors."""
    from fusedtune.triton_kernels import lora_tma
    if lora_tma._INTERP:
        pytest.skip("the interpreter runs it on CPU tensors")
    monkeypatch.setattr(lora_tma, "ENABLED", True)
    p = torch.zeros(64, 64, dtype=torch.bfloat16)
    assert not lora_tma.available("cpu")
    assert not lora_tma.usable(p, p, p.stride(), p)


def test_fast_launch_serves_the_tma_kernel(monkeypatch):
    """The kernel's repeated launches take fusedtune's fast launch (triton_kernels/launch.py), not Triton's
    own path (about 30 us more a launch on a GPU machine's host): compiled for sm_90 and "launched" by the
    no-GPU driver, the first call of each orientation goes through Triton (autotuning), the rest do not."""
    from fusedtune.bench import nogpu_driver
    from fusedtune.triton_kernels import launch
    from fusedtune.triton_kernels import lora as tk
    from fusedtune.triton_kernels import lora_tma
    if lora_tma._INTERP:
        pytest.skip("the fast launch is off in the interpreter")
    monkeypatch.setattr(lora_tma, "_sm_count", lambda index: 132)
    g = torch.Generator().manual_seed(0)
    p, t = torch.randn(64, 128, generator=g).bfloat16(), torch.randn(64, 16, generator=g)
    q, e = torch.randn(96, 128, generator=g).bfloat16(), torch.randn(96, 16, generator=g)
    c = torch.empty(64, 96, dtype=torch.bfloat16)
    fk = launch.fast(lora_tma.lora_gemm_tma_kernel)
    before = dict(fk.stats)
    with nogpu_driver.active():
        for strides in (q.stride(), q.stride(), q.stride(), (1, 96)):     # forward x 3, then the dX orientation
            lora_tma.gemm(p, q if strides[1] == 1 else q.t().contiguous(), strides, c, t, e, e.stride(), None,
                          tk._NO_DROP, "tf32")
    assert fk.stats["triton"] - before["triton"] == 2 and fk.stats["fast"] - before["fast"] == 2, fk.stats
