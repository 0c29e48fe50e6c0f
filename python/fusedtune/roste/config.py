"""RotationConfig: the per-layer online-rotation choice of search_rotation, saved as JSON."""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from .checks import check_bits, check_clip


@dataclass
class RotationConfig:
    """rotate[name]: whether RoSTELinear `name` rotates its input and weight online; err_rotated[name] /
    err_plain[name]: MSE(Q_w(W H) - W H) + MSE(Q_a(X H) - X H) and MSE(Q_w(W) - W) + MSE(Q_a(X) - X) on the
    calibration inputs (err_rotated None where in_features has no Hadamard construction); the bits and
    clip ratio the errors were measured at."""
    rotate: dict[str, bool]
    err_rotated: dict[str, float | None] = field(default_factory=dict)
    err_plain: dict[str, float] = field(default_factory=dict)
    w_bits: int = 4
    a_bits: int = 4
    clip_ratio: float = 0.95

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        what = "RotationConfig"
        if not isinstance(self.rotate, dict) or not all(isinstance(k, str) and isinstance(v, bool)
                                                        for k, v in self.rotate.items()):
            raise TypeError(f"{what}: rotate must map layer names (str) to bool, got {self.rotate!r}")
        for nm, d, none_ok in (("err_rotated", self.err_rotated, True), ("err_plain", self.err_plain, False)):
            if not isinstance(d, dict):
                raise TypeError(f"{what}: {nm} must be a dict, got {type(d).__name__}")
            for k, v in d.items():
                if k not in self.rotate:
                    raise ValueError(f"{what}: {nm} names {k!r}, which rotate does not")
                ok = (v is None and none_ok) or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 and math.isfinite(v) and v >= 0)
                if not ok:
                    raise ValueError(f"{what}: {nm}[{k!r}] must be a finite error >= 0"
                                     f"{' or None' if none_ok else ''}, got {v!r}")
        check_bits(what, "w_bits", self.w_bits)
        check_bits(what, "a_bits", self.a_bits)
        check_clip(what, self.clip_ratio)

    def save(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"format": "fusedtune.roste.RotationConfig", "version": 1, **asdict(self)}, f, indent=1,
                      sort_keys=True)

    @classmethod
    def load(cls, path) -> "RotationConfig":
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("format") != "fusedtune.roste.RotationConfig":
            raise ValueError(f"RotationConfig.load: {path} is not a saved RotationConfig")
        if d.get("version") != 1:
            raise ValueError(f"RotationConfig.load: {path} has version {d.get('version')!r}; this reads version 1")
        keys = ("rotate", "err_rotated", "err_plain", "w_bits", "a_bits", "clip_ratio")
        missing = [k for k in keys if k not in d]
        if missing:
            raise ValueError(f"RotationConfig.load: {path} lacks {', '.join(missing)}")
        return cls(**{k: d[k] for k in keys})

    def rotated(self) -> list[str]:
        return [k for k, v in self.rotate.items() if v]
