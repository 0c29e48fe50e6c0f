"""fusedtune.nn: drop-in layers of every family."""
from .hft import RowMaskedLinear  # noqa: F401
from .sparse_delta import SparseDeltaLinear  # noqa: F401
from .lora import LoRALinear  # noqa: F401
from .fp8 import FP8Linear  # noqa: F401
from .roste import RoSTELinear  # noqa: F401
