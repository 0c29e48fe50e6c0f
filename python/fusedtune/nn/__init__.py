"""fusedtune.nn: drop-in layers of every family."""
from .hft import RowMaskedLinear  # noqa: F401
