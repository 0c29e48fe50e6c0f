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
