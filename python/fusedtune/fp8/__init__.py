"""fusedtune.fp8: FP8 training (E4M3, 1x128 / 128x128 scales). convert(model) swaps the linear layers
for fusedtune.nn.FP8Linear; the ops are in fusedtune.ops.fp8; docs/fp8.md has the scale convention."""
from ..nn.fp8 import FP8Linear, convert  # noqa: F401
