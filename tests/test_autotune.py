"""FUSEDTUNE_AUTOTUNE: "full" is triton.autotune as it is; "one" gives every kernel variant one config,
untimed (the GPU tests use it so that a variant compiles once, not once per config)."""
import pytest
import torch
import triton
import triton.language as tl

from fusedtune.triton_kernels import common


@triton.jit
def _k(x_ptr, n, FLAG: tl.constexpr, BLOCK: tl.constexpr):
    pass


CONFIGS = [triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128, 256)]


def test_full_mode_is_plain_autotune(monkeypatch):
    monkeypatch.delenv(common.AUTOTUNE_ENV, raising=False)
    tuned = common.autotune(CONFIGS, key=["n"])(_k)
    assert tuned.early_config_prune is None and tuned.configs == CONFIGS


def test_one_mode_prunes_to_one_config_and_does_not_time(monkeypatch):
    monkeypatch.setenv(common.AUTOTUNE_ENV, "one")
    tuned = common.autotune(CONFIGS, key=["n"])(_k)
    assert tuned.early_config_prune is common.variant_config
    calls = []
    assert tuned.do_bench(lambda: calls.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert calls == []          # nothing launched: the real launch compiles the one config


def test_variant_config_is_stable_per_variant_and_spreads_over_variants():
    x16, x32 = torch.empty(4, dtype=torch.bfloat16), torch.empty(4, dtype=torch.float32)
    pick = lambda x, n, **meta: common.variant_config(CONFIGS, {"x_ptr": x, "n": n}, **meta)  # noqa: E731
    one = pick(x16, 100, FLAG=True)
    assert len(one) == 1 and one[0] in CONFIGS
    assert pick(x16, 4096, FLAG=True) == one          # another shape, same variant: same config (one compile)
    assert pick(x16, 100, FLAG=True, stride=7) == one  # int meta-parameters are shapes, not variants
    picks = {pick(x, 1, FLAG=f, MODE=m)[0].kwargs["BLOCK"] for x in (x16, x32) for f in (False, True)
             for m in ("a", "b", "c")}
    assert len(picks) >= 3                            # 12 variants do not all land on one config


def test_bad_mode_is_refused(monkeypatch):
    monkeypatch.setenv(common.AUTOTUNE_ENV, "fast")
    with pytest.raises(ValueError, match="FUSEDTUNE_AUTOTUNE='fast'.*full.*one"):
        common.autotune(CONFIGS, key=["n"])
