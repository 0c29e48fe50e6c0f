"""Every registered method under DistributedDataParallel (two CPU processes, gloo; MeZO without a wrapper,
it takes no gradients): each rank trains on its own batch, and after three steps both ranks hold the
same weights bit for bit, the steps trained, and fusedtune warned about nothing (DDP's first broadcast
rewrites the deltas and row masters with their own values: not an outside change)."""
import warnings

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers")
from ranks import gloo_worker, run_ranks  # noqa: E402
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

CASES = ["full", "lora", "qlora", "fp8", "fp8_lora", "hft", "hft-row", "hft-block", "sparse_delta", "sparse_delta-regrow",
         "roste", "mezo"]
REGROW = {"every": 2, "accumulate_steps": 1, "rate": 0.5, "decay": "constant"}   # a selection at step 2


def _options(variant: str) -> dict:
    if variant == "regrow":
        return {"regrow": REGROW}
    return {"granularity": variant} if variant else {}


def _ranks_train(rank, res):
    import fusedtune
    from fusedtune.patch import methods, missing_requirements
    from tiny_models import tiny_llama
    for case in CASES:
        name, _, variant = case.partition("-")
        if missing_requirements(methods()[name]):
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            m = tiny_llama()
            m.train()
            torch.manual_seed(3)
            rep = fusedtune.patch(m, name, **_options(variant))
            before = [p.detach().clone() for p in m.parameters()]
            run = m if name == "mezo" else torch.nn.parallel.DistributedDataParallel(m)
            ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(10 + rank))
            losses = [float(rep.step(lambda: run(ids, labels=ids).loss)) for _ in range(3)]
            after = float(m(ids, labels=ids).loss.detach())
        res[case] = {"params": [p.detach().clone() for p in m.parameters()], "first": losses[0], "after": after,
                     "buffers": [b.clone() for b in m.buffers()],
                     "moves": [h["moved"] for h in rep.regrower.history] if variant == "regrow" else None,
                     "moved": any(not torch.equal(a, b) for a, b in zip(m.parameters(), before)),
                     "warned": [str(w.message) for w in caught if "fusedtune" in str(w.message)]}
    res["refused"] = _refusals()


def _refusals() -> dict:
    """What a model DDP wraps already gets (found by audit: patched after the wrap, the ranks drifted apart)."""
    import fusedtune
    from fusedtune import roste
    from fusedtune.hft import HalfFineTuner, HFTError
    from fusedtune.patch import PatchError
    from tiny_models import tiny_llama
    wrapped = torch.nn.parallel.DistributedDataParallel(tiny_llama())
    out = {}
    for what, call, err in (("patch", lambda: fusedtune.patch(wrapped, "lora"), PatchError),
                            ("hft", lambda: HalfFineTuner(wrapped), HFTError),
                            ("roste", lambda: roste.prepare(wrapped), ValueError)):
        try:
            call()
            out[what] = "accepted"
        except err as e:
            out[what] = str(e)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return run_ranks(gloo_worker, out, _ranks_train)


@pytest.mark.parametrize("case", CASES)
def test_ranks_stay_identical_and_train(ranks, case):
    r0, r1 = ranks
    if case not in r0:
        pytest.skip(f"{case}: requirements missing")
    assert all(torch.equal(a, b) for a, b in zip(r0[case]["params"], r1[case]["params"]))
    assert all(torch.equal(a, b) for a, b in zip(r0[case]["buffers"], r1[case]["buffers"]))   # delta positions too
    if case == "sparse_delta-regrow":
        assert r0[case]["moves"] == r1[case]["moves"] and r0[case]["moves"][0] > 0, "both ranks regrew alike"
    for r in (r0, r1):
        assert r[case]["moved"] and r[case]["warned"] == []
        if case != "mezo":   # MeZO's first loss is both ranks' mean (perturbed); its 3 steps need not descend
            assert r[case]["after"] < r[case]["first"]


def test_a_model_ddp_wraps_is_refused(ranks):
    for r in ranks:
        for what in ("patch", "hft", "roste"):
            assert "wrapped in DistributedDataParallel already" in r["refused"][what], (what, r["refused"][what])
