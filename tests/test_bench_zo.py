"""The zo benchmark family's rows say what they compare (the CPU run itself: tests/test_bench.py)."""
from fusedtune.bench import zo as zo_bench

from fakes import CallOnceTimer


def test_mezo_step_rows_say_only_the_cost_is_compared():
    """MeZO's loop draws its noise from torch's RNG, ours from Philox: the perturbed weights differ by design, so
    the rows are not checked against it and say so; the pass rows (vs torch._foreach_mul_ over the same bytes)
    compare no result either."""
    sections = dict(zo_bench.sections(CallOnceTimer(), quick=True))
    step = sections["MeZO step perturbation"]()
    assert [r["kernel"] for r in step] == ["mezo step perturbation (3 passes)",
                                           "mezo step perturbation (fold=True, 2 passes)"]
    for r in step:
        assert r["note"].endswith("; " + zo_bench.NOT_CHECKED) and "torch's RNG" in r["note"]
    assert not any("checked" in r["note"] for r in sections["pass bandwidth"]())
