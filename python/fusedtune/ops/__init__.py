"""fusedtune.ops: every family's ops (torch.library custom ops with fake impls)."""
from .zo import zo_apply_, zo_noise  # noqa: F401
from .lora import lora_linear, lora_linear_grouped, lora_linear_multi  # noqa: F401
from .dora import dora_linear, dora_weight_norm  # noqa: F401
from .sparse_delta import sddmm, sparse_adamw_, sparse_delta_linear  # noqa: F401
from .sparse_delta_select import regrow_candidates, sm3_update  # noqa: F401
from .hft import hft_row_linear, masked_adamw_, row_grad  # noqa: F401
from .fp8 import fp8_gemm, fp8_linear, fp8_quantize_128x128, fp8_quantize_1x128  # noqa: F401
from .roste import hadamard, rotate_fake_quant  # noqa: F401

__all__ = ["zo_apply_", "zo_noise", "lora_linear", "lora_linear_grouped", "lora_linear_multi", "dora_linear",
           "dora_weight_norm", "sddmm", "sparse_adamw_", "sparse_delta_linear",
           "regrow_candidates", "sm3_update", "hft_row_linear", "masked_adamw_",
           "row_grad", "fp8_gemm", "fp8_linear", "fp8_quantize_128x128", "fp8_quantize_1x128", "hadamard",
           "rotate_fake_quant"]
