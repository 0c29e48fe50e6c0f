"""fusedtune.ops: every family's ops (torch.library custom ops with fake impls)."""
from .zo import zo_apply_, zo_noise  # noqa: F401
from .lora import lora_linear, lora_linear_grouped, lora_linear_multi  # noqa: F401
