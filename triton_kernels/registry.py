"""What each Triton kernel ships, for the ahead-of-time kernel report (python -m fusedtune kernels).

Every module triton_kernels/<family>.py appends KernelSpec entries to KERNELS at import. A spec
names the @triton.jit function, its argument types as triton.compile wants them (e.g. "*i16",
"i64", "fp32"; constexpr arguments are given in `constexprs` per config), the configs it launches
with (each a dict of constexpr values plus num_warps / num_stages), and whether it is a GEMM
(a GEMM must show tensor-core instructions on every target it claims; `requires` names the one it
must show on a target, e.g. FP8's QGMMA on sm_90, where any other would mean an upcast).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class KernelSpec:
    family: str
    name: str
    fn: object                      # the triton.jit function
    signature: dict                 # non-constexpr argument name -> triton type string
    configs: list                   # [{"constexprs": {...}, "num_warps": 4, "num_stages": 1}, ...]
    gemm: bool = False
    targets: tuple = (80, 89, 90)   # compute capabilities the kernel claims
    options: dict = dataclasses.field(default_factory=dict)  # extra compile options (enable_fp_fusion=False)
    requires: dict = dataclasses.field(default_factory=dict)  # cc -> the tensor-core instruction it must show


KERNELS: list[KernelSpec] = []


def register(spec: KernelSpec) -> KernelSpec:
    KERNELS.append(spec)
    return spec


def all_kernels() -> list[KernelSpec]:
    """Import every family module so that its specs are registered, then return them all."""
    import importlib
    import pkgutil

    from . import __name__ as pkg, __path__ as path
    for m in pkgutil.iter_modules(path):
        if m.name != "registry":
            importlib.import_module(f"{pkg}.{m.name}")
    return list(KERNELS)
