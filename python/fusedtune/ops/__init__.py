"""fusedtune.ops: every family's ops (torch.library custom ops with fake impls)."""
from .zo import zo_apply_, zo_noise  # noqa: F401
