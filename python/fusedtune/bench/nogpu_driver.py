"""A Triton driver for a machine without a GPU, so that host time can be measured there (a diagnostic).

`active(arch=90)` (a context manager) makes Triton compile every kernel launched from Python for
sm_<arch> (ptxas from the Triton wheel), "load" it without a driver, and "launch" it by reading its tensor
arguments' data pointers, as the CUDA launcher does, and nothing else: the tensors are CPU tensors and no
kernel runs. `install(arch=90)` does so for the rest of the process, makes fusedtune route its ops to the
Triton backend on CPU tensors, and answers the device queries its launch code makes (SM count 132,
capability 9.0): bench/host_profile.py --no-gpu. What runs is everything a call costs the host on a GPU
machine except the driver's launch itself (cuLaunchKernelEx, a few microseconds) and CUDA's allocator (CPU
tensors are allocated instead): fusedtune's glue, the autograd engine, torch's tensor ops, Triton's
autotuner and launch path. Tests use `active` to check which compiled kernel a launch gets
(tests/test_triton_launch.py). No output is computed: the tensors keep what they held.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

_SMEM = 232448      # H100/H200: 227 KiB of shared memory a block
_installed = []


class _Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": _SMEM, "multiprocessor_count": 132, "max_num_regs": 65536,
                "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 0, 0, 1024       # module, function, registers, spills, max threads a block (not None: loaded)

    def unload_module(self, module):
        pass


last_launch: dict = {}    # the latest launch: its grid, function and arguments (tests compare two launches)


def _launcher(src, metadata):
    def launch(gx, gy, gz, stream, function, packed, launch_metadata, enter_hook, exit_hook, *args):
        for a in args:                       # the CUDA launcher reads each tensor's pointer
            if isinstance(a, torch.Tensor):
                a.data_ptr()
        last_launch.update(grid=(gx, gy, gz), packed=packed, args=args, src=src, num_warps=metadata.num_warps)
    return launch


def _bench(kernel_call, quantiles=None, **kwargs):
    kernel_call()                            # compiles and "launches" the config once; every config ties
    return [1.0] * len(quantiles) if quantiles else 1.0


def _driver(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class NoGpuDriver(DriverBase):
        utils = _Utils()
        launcher_cls = staticmethod(_launcher)

        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            return ty

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            return _bench

        def get_device_interface(self):
            return torch.cuda

        def get_empty_cache_for_benchmark(self):
            return torch.empty(0)

        def clear_cache(self, cache):
            pass

    return NoGpuDriver()


@contextlib.contextmanager
def active(arch: int = 90):
    """Triton's active driver is the no-GPU one inside the scope (module docstring)."""
    from triton.runtime import driver
    prev = driver._active
    driver.set_active(_driver(arch))
    try:
        yield
    finally:
        driver._active = prev


def install(arch: int = 90):
    """Switch this process to the no-GPU driver and route fusedtune's Triton ops to CPU tensors."""
    if _installed:
        return
    from triton.runtime import driver

    import fusedtune.backend as be
    driver.set_active(_driver(arch))
    serve = be.can_serve

    @functools.wraps(serve)
    def can_serve(name, device, has):
        if name == "triton" and name in has and device.type == "cpu":
            return True, ""
        return serve(name, device, has)

    be.can_serve = can_serve
    os.environ["FUSEDTUNE_BACKEND"] = "triton"   # auto would take the reference on CPU tensors
    be.triton_status = lambda: (True, "")
    torch.cuda.get_device_capability = lambda device=None: (arch // 10, arch % 10)
    torch.cuda.get_device_properties = lambda device=None: _Props()
    torch.cuda.current_device = lambda: 0
    _installed.append(arch)


class _Props:
    multi_processor_count = 132
    name = "no GPU (host-time diagnostic)"
    total_memory = 141 * 2**30
    major, minor = 9, 0
