"""sparse_delta: the tiled SDDMM (sddmm_tile.h) through its CPU twin, which runs the CUDA kernel's
phases thread id by thread id: results within the tolerance rule of the fp64 gradient, bit-identical
whatever the tile shape and batch size (only the token splits group the sums differently), the
planner's promises, and bad plans refused."""
import pytest
import torch

import fusedtune
from fusedtune.ops import sparse_delta as sd
from fusedtune.testing import assert_same_bits, assert_within_rule

pytestmark = pytest.mark.skipif(not fusedtune._ext.loaded(), reason="needs the C++ extension")
kernel = torch.ops.fusedtune.sddmm_kernel if fusedtune._ext.loaded() else None


def _problem(T, out, inp, k, dtype, seed=0, rows=None):
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(T, out, generator=g).to(dtype)
    x = torch.randn(T, inp, generator=g).to(dtype)
    if rows is None:
        idx = torch.randperm(out * inp, generator=g)[:k]
    else:  # every index in a few rows: skewed tiles, empty tiles, rows longer than a batch
        idx = torch.cat([r * inp + torch.randperm(inp, generator=g)[: k // len(rows)] for r in rows])
    return dy, x, idx.sort().values.to(torch.int32)


def _exact(dy, x, idx):
    r, c = idx.long() // x.shape[1], idx.long() % x.shape[1]
    return (dy.double()[:, r] * x.double()[:, c]).sum(0), (dy.float()[:, r] * x.float()[:, c]).sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,out,inp,k,plan", [
    (45, 19, 23, 70, [64, 64, 1, 256, 48]),         # one tile, T not a multiple of 16
    (200, 77, 129, 500, [16, 32, 3, 5, 80]),      # ragged edge tiles, 3 splits, batches of 5 items
    (33, 300, 7, 900, [64, 4, 2, 1, 32]),         # one item per batch, tiles narrower than 16
    (130, 50, 60, 0, [64, 64, 1, 256, 144]),      # no indices
])
def test_matches_fp64_gradient(dtype, T, out, inp, k, plan):
    dy, x, idx = _problem(T, out, inp, k, dtype)
    got = kernel(dy, x, idx, plan)
    exact, unfused = _exact(dy, x, idx)
    assert got.dtype == torch.float32 and got.shape == (k,)
    if k:
        assert_within_rule(got, exact, unfused, "tiled sddmm", atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tile_shape_and_batches_do_not_change_bits(dtype):
    """Each item sums the same 16-token chunks in the same order whatever tile or batch it falls in; a
    wrong row, column or position in the bookkeeping would change its value."""
    dy, x, idx = _problem(160, 150, 90, 1500, dtype, seed=1)
    for splits, span in ((1, 160), (4, 48)):
        want = kernel(dy, x, idx, [64, 64, splits, 4096, span])
        for R, C, cap in ((150, 90, 2048), (16, 8, 3), (7, 33, 1), (256, 1, 40), (1, 256, 9)):
            assert_same_bits(kernel(dy, x, idx, [R, C, splits, cap, span]), want, f"R={R} C={C} cap={cap}")


def test_skewed_rows_and_empty_tiles():
    dy, x, idx = _problem(70, 200, 300, 900, torch.float32, seed=2, rows=[0, 7, 199])
    exact, unfused = _exact(dy, x, idx)
    for plan in ([64, 64, 2, 100, 48], [8, 512, 1, 17, 80], [256, 16, 5, 256, 16]):
        assert_within_rule(kernel(dy, x, idx, plan), exact, unfused, f"plan {plan}", atol=1e-5)


def test_no_tokens_give_zero_gradients():
    dy, x, idx = _problem(0, 20, 30, 40, torch.float32)
    assert torch.equal(kernel(dy, x, idx, [64, 64, 1, 256, 16]), torch.zeros(40))


def test_unchecked_bad_indices_stay_in_bounds():
    """check=False skips the host check; unsorted, duplicate or out-of-range indices must then give
    wrong numbers, never a read or write outside the tensors (CUDA: never a fault)."""
    dy, x, _ = _problem(40, 30, 20, 0, torch.float32)
    for bad in ([5, 3, 3, 599, 0], [-7, 600, 1000000, 2, 1]):
        out = kernel(dy, x, torch.tensor(bad, dtype=torch.int32), [8, 8, 2, 2, 32])
        assert out.shape == (5,)


def test_op_backends_agree():
    dy, x, idx = _problem(3 * 37, 41, 53, 400, torch.float32, seed=3)
    got = sd.sddmm(dy.reshape(3, 37, 41), x.reshape(3, 37, 53), idx, backend="cpu")
    plan = sd._device_plan(dy, x, idx)
    assert_same_bits(got, kernel(dy, x, idx, plan), "backend cpu vs the kernel with the device plan")
    exact, unfused = _exact(dy, x, idx)
    assert_within_rule(got, exact, unfused, "backend cpu", atol=1e-5)
    assert sd.sparse_delta_backend("cpu")["sddmm"]["backend"] == "cpu"
    torch.library.opcheck(kernel.default, (dy, x, idx, plan))


@pytest.mark.parametrize("plan,msg", [
    ([64, 64, 1, 256], "plan must be"),
    ([64, 64, 1, 256, 40], "span a positive multiple of 16"),
    ([64, 64, 1, 256, 16], "splits \\* span >= T"),
    ([0, 64, 1, 256, 48], "tile rows and columns"),
    ([64, 70000, 1, 256, 48], "tile rows and columns"),
    ([64, 64, 1, 0, 48], "1 <= cap"),
])
def test_bad_plans_refused(plan, msg):
    dy, x, idx = _problem(45, 19, 23, 70, torch.float32)
    with pytest.raises(RuntimeError, match=msg):
        kernel(dy, x, idx, plan)


def test_bad_tensors_refused():
    dy, x, idx = _problem(45, 19, 23, 70, torch.float32)
    plan = [64, 64, 1, 256, 48]
    for args, msg in (((dy, x.double(), idx), "share a dtype"),
                      ((dy.double(), x.double(), idx), "float32, bfloat16 or float16"),
                      ((dy, x, idx.long()), "int32"),
                      ((dy[:40], x, idx), "same tokens"),
                      ((dy.t(), x.t(), idx), "same tokens|contiguous")):
        with pytest.raises(RuntimeError, match=msg):
            kernel(*args, plan)


@pytest.mark.parametrize("N,K,T,k,elem,budget,parallel", [
    (4096, 4096, 4096, 167772, 2, 115712, 264),      # H100/H200: q/o_proj at 1%
    (14336, 4096, 8192, 587203, 2, 115712, 264),     # gate/up at 1%
    (4096, 14336, 8192, 1409286, 2, 115712, 264),    # down at 2.4%
    (4096, 4096, 4096, 167772, 2, 82944, 216),       # A100
    (4096, 4096, 4096, 167772, 4, 50176, 256),       # sm_89, fp32
    (77, 129, 333, 500, 2, 115712, 264),
    (5, 3, 10, 2, 4, 262144, 8),
])
def test_plan_promises(N, K, T, k, elem, budget, parallel):
    R, C, splits, cap, span = sd.sddmm_plan(N, K, T, k, elem, budget, parallel)
    assert 1 <= R <= N and 1 <= C <= K and cap >= 256 and cap % 256 == 0
    assert sd.sddmm_smem(R, C, cap, elem) <= budget
    assert span % 16 == 0 and splits * span >= T and (splits - 1) * span < max(T, 1)
    tiles = -(-N // R) * -(-K // C)
    assert splits <= max(1, -(-T // sd.SDDMM_MIN_SPAN))
    # the split count that leaves the busiest SM the least work: waves x (tokens per split + setup)
    work = lambda s: -(-tiles * s // parallel) * (max(16, -(-(-(-T // s)) // 16) * 16) + sd.SDDMM_SETUP_TOKENS)  # noqa
    assert all(work(splits) <= work(s) for s in range(1, max(1, -(-T // sd.SDDMM_MIN_SPAN)) + 1))
    assert cap >= R * C * k / (N * K)   # a tile's expected items fit one batch
    if N * K >= 4096 * 4096:
        # staged elements per token at most half of what streaming every index's tokens reads (2k)
        assert tiles * (R + C) <= k


def test_plan_refuses_a_budget_without_room():
    with pytest.raises(ValueError, match="hold no tile"):
        sd.sddmm_plan(4096, 4096, 4096, 1000, 2, 4096, 8)


def test_the_kernel_refuses_a_weight_of_2_to_the_31_elements():
    """out * in = 2^31 is refused, as SparseDeltaLinear refuses it (found by review: the kernel's check let it through,
    and its int32 flat indices and entry counts cannot hold it). Zero rows: nothing is allocated."""
    with pytest.raises(RuntimeError, match="must be below 2\\^31"):
        kernel(torch.empty(0, 2 ** 16), torch.empty(0, 2 ** 15), torch.zeros(1, dtype=torch.int32), [16, 16, 1, 1, 1])
