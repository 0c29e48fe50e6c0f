"""Fine-tuning methods for fusedtune.patch, one module per family; importing this package registers
them all. A family adds `from . import <family>  # noqa: F401` here."""
from . import full  # noqa: F401
from . import zo  # noqa: F401
from . import hft  # noqa: F401
from . import sparse_delta  # noqa: F401
from . import lora  # noqa: F401
from . import fp8  # noqa: F401
from . import roste  # noqa: F401
