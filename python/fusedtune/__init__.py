"""fusedtune: fused CUDA and Triton kernels for fine-tuning large language models."""
from . import _ext  # noqa: F401  (loads fusedtune._C when built; never raises)
from .backend import BackendError, backends, use_backend  # noqa: F401
from . import fp8, lora, ops, optim, roste  # noqa: F401
from .patch import PatchError, patch, register_method, report, unpatch  # noqa: F401,E402
from .doctor import doctor  # noqa: F401,E402

__version__ = "0.1.0"
