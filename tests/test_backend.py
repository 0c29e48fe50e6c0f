"""Backend selection rules (fusedtune.backend): a per-call backend= is taken at its word; a scope or
FUSEDTUNE_BACKEND applies to the ops that have that backend, and ops without it choose automatically
(said once) instead of raising."""
import warnings

import pytest
import torch

import fusedtune
from fusedtune import backend as fb
from fusedtune.ops import hadamard, lora_linear


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(fb, "_warned", set())


def _lora_case():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(5, 8, generator=g), torch.randn(6, 8, generator=g), torch.randn(2, 8, generator=g),
            torch.randn(6, 2, generator=g))


@pytest.mark.parametrize("how", ["scope", "env"])
def test_process_choice_skips_ops_without_that_backend(how, monkeypatch):
    x, W, A, B = _lora_case()
    want = lora_linear(x, W, A, B, 0.5, backend="reference")
    if how == "env":
        monkeypatch.setenv("FUSEDTUNE_BACKEND", "cuda")
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        if how == "scope":
            with fusedtune.use_backend("cuda"):
                got = [lora_linear(x, W, A, B, 0.5) for _ in range(2)]
        else:
            got = [lora_linear(x, W, A, B, 0.5) for _ in range(2)]
    for y in got:
        torch.testing.assert_close(y, want)
    said = [str(w.message) for w in rec if "has no 'cuda' backend" in str(w.message)]
    assert len(said) == 1 and "lora_linear" in said[0], [str(w.message) for w in rec]
    assert fb.explain("lora_linear", torch.device("cpu"), ("reference", "cpu", "triton"))["backend"] in ("cpu",
                                                                                                      "reference")


def test_process_choice_still_raises_where_the_op_has_it_but_cannot_run():
    x = torch.randn(3, 64)
    with fusedtune.use_backend("cuda"):       # hadamard has a CUDA kernel; a CPU tensor cannot use it
        with pytest.raises(fb.BackendError, match="hadamard: backend 'cuda' cannot run here"):
            hadamard(x)


def test_per_call_request_is_taken_at_its_word():
    x, W, A, B = _lora_case()
    with pytest.raises(fb.BackendError, match="backend 'cuda' cannot run here: the op has no cuda"):
        lora_linear(x, W, A, B, 0.5, backend="cuda")


def test_every_family_op_is_in_fusedtune_ops():
    """The paths the issues and docs name: fusedtune.ops.<op> for every family."""
    import fusedtune.ops as ops
    from fusedtune.ops import dora, fp8, hft, lora, roste, sparse_delta, zo
    for mod, names in ((zo, ["zo_apply_", "zo_noise"]), (lora, ["lora_linear", "lora_linear_multi"]),
                       (dora, ["dora_linear", "dora_weight_norm"]),
                       (sparse_delta, ["sddmm", "sparse_adamw_", "sparse_delta_linear"]),
                       (hft, ["row_grad", "hft_row_linear", "masked_adamw_"]),
                       (fp8, ["fp8_quantize_1x128", "fp8_quantize_128x128", "fp8_gemm", "fp8_linear"]),
                       (roste, ["hadamard", "rotate_fake_quant"])):
        for n in names:
            assert getattr(ops, n) is getattr(mod, n) and n in ops.__all__


def test_scope_is_traced_by_compile_and_guarded():
    """A fullgraph compile reads the scope (torch 2.11's dynamo could not trace a ContextVar) and
    recompiles when it changes, instead of keeping the backend it first saw."""
    torch._dynamo.reset()
    f = torch.compile(lambda x: x + len(fb.requested()), fullgraph=True, backend="eager")
    x = torch.zeros(2)
    assert f(x).tolist() == [4.0, 4.0]                  # "auto"
    with fusedtune.use_backend("reference"):
        assert f(x).tolist() == [9.0, 9.0]
        with fusedtune.use_backend("cpu"):
            assert f(x).tolist() == [3.0, 3.0]
        assert f(x).tolist() == [9.0, 9.0]
    assert f(x).tolist() == [4.0, 4.0]


def test_scope_belongs_to_its_thread():
    import threading
    seen = []
    with fusedtune.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(fb.requested()))
        t.start()
        t.join()
        seen.append(fb.requested())
    assert seen == ["auto", "reference"]


def test_resolve_memo_follows_the_environment_and_the_scope(monkeypatch):
    """resolve() keeps its answers by the environment and the scope it read, through os.environ's own dict:
    a change between two calls of the same op reaches the second one (also in a thread that never entered a
    scope, and when os.environ is replaced by another mapping)."""
    import os
    import threading
    dev, has = torch.device("cpu"), ("reference", "cpu", "cuda")
    monkeypatch.delenv("FUSEDTUNE_BACKEND", raising=False)
    auto = fb.resolve("memo_probe", dev, has)
    assert auto in ("cpu", "reference")
    monkeypatch.setenv("FUSEDTUNE_BACKEND", "cuda")     # the op has cuda, which cannot run on CPU tensors
    with pytest.raises(fb.BackendError, match="memo_probe: backend 'cuda' cannot run here"):
        fb.resolve("memo_probe", dev, has)
    monkeypatch.setenv("FUSEDTUNE_BACKEND", "reference")
    assert fb.resolve("memo_probe", dev, has) == "reference"
    monkeypatch.delenv("FUSEDTUNE_BACKEND")
    assert fb.resolve("memo_probe", dev, has) == auto
    seen = []
    with fusedtune.use_backend("reference"):
        t = threading.Thread(target=lambda: seen.append(fb.resolve("memo_probe", dev, has)))
        t.start()
        t.join()
        seen.append(fb.resolve("memo_probe", dev, has))
    assert seen == [auto, "reference"]
    monkeypatch.setattr(os, "environ", dict(os.environ, FUSEDTUNE_BACKEND="reference"))
    assert fb.resolve("memo_probe", dev, has) == "reference"
