"""Model-level RoSTE (docs/roste.md, "Model-level API"): quantization-aware fine-tuning with rotations.

    rep = fusedtune.roste.prepare(model, w_bits=4, a_bits=4, kv_bits=None, clip_ratio=0.95)
          # fold norms, merge the hidden-size Hadamard rotation, RoSTELinear layers, K/V fake quant
    cfg = fusedtune.roste.search_rotation(model, batches)    # per-layer online rotation, RoSTE's rule
    fusedtune.roste.apply_rotation(model, cfg); cfg.save("rot.json"); RotationConfig.load("rot.json")
    q = fusedtune.roste.export(model)      # a copy with QuantizedLinear layers (uint8 codes, scale, zero)
    fusedtune.roste.rotate_model(model)    # only the function-preserving fold + rotations
    fusedtune.roste.unprepare_kv(model)    # remove the K/V quantization (attention implementation back)
"""
from .config import RotationConfig
from .export import QuantizedLinear, export
from .kv import KVQuant, add_kv_quant, kv_specs, unprepare_kv
from .prepare import PrepareReport, prepare
from .rotate_model import rotate_model
from .search import apply_rotation, layer_errors, search_rotation

__all__ = ["KVQuant", "PrepareReport", "QuantizedLinear", "RotationConfig", "add_kv_quant", "apply_rotation",
           "export", "kv_specs", "layer_errors", "prepare", "rotate_model", "search_rotation", "unprepare_kv"]
