"""The kernel report (python -m fusedtune kernels): Triton kernels compiled ahead of time for every
target they claim, and the cubins of the built extension -- no GPU needed (DESIGN.md step 4)."""
from __future__ import annotations

import json

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fusedtune import _ext  # noqa: E402
from fusedtune.bench import kernels as K  # noqa: E402
from fusedtune.triton_kernels.registry import KernelSpec, all_kernels  # noqa: E402

pytestmark = pytest.mark.skipif(K.find_cuobjdump() is None, reason="no cuobjdump (Triton wheel or CUDA toolkit)")


# Test-local kernels: a tensor-core GEMM and an elementwise kernel (never registered globally).
@triton.jit
def _t_gemm(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(tl.float16))


@triton.jit
def _t_scale(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) * s, mask=m)


GEMM = KernelSpec(family="test", name="t_gemm", fn=_t_gemm, gemm=True,
                  signature={"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp16", "M": "i32", "N": "i32", "K": "i32"},
                  configs=[{"constexprs": {"BM": 64, "BN": 64, "BK": 32}, "num_warps": 4, "num_stages": 3}])
# an elementwise kernel wrongly claiming to be a GEMM: the checker must flag it
FAKE_GEMM = KernelSpec(family="test", name="t_scale_as_gemm", fn=_t_scale, gemm=True,
                       signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "s": "fp32"},
                       configs=[{"constexprs": {"BLOCK": 1024}, "num_warps": 4}], options={"enable_fp_fusion": False})
SCALE = KernelSpec(family="test", name="t_scale", fn=_t_scale, targets=(80,),
                   signature=FAKE_GEMM.signature, configs=FAKE_GEMM.configs, options=FAKE_GEMM.options)


@pytest.fixture(scope="module")
def registered_rows():
    specs = all_kernels()     # with the row cache, so that the CLI step of tools/dev.sh test reuses the rows
    return specs, K.collect(include_cuda=False, cache_dir=K.default_cache_dir())


@pytest.fixture(scope="module")
def local_rows():
    rows = K.collect(include_cuda=False, specs=[GEMM, FAKE_GEMM, SCALE])
    return {(r["kernel"], r["cc"]): r for r in rows}


@pytest.fixture(scope="module")
def cuda_rows():
    if not _ext.with_cuda():
        pytest.skip(f"fusedtune._C has no CUDA kernels here ({_ext.error() or 'built without CUDA'})")
    notes = []
    return K.collect(include_triton=False, notes=notes, cache_dir=K.default_cache_dir()), notes


def test_every_registered_kernel_compiles_for_its_targets_without_spills(registered_rows):
    specs, rows = registered_rows
    assert any(s.family == "zo" and s.name == "zo_apply_kernel" for s in specs), "zo kernel is not registered"
    expected = {(s.family, s.name, K.config_label(c, s), cc) for s in specs for c in s.configs for cc in s.targets}
    got = {(r["family"], r["kernel"], r["config"], r["cc"]) for r in rows}
    assert got == expected
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["regs"] and r["regs"] > 0
        assert r["spill_bytes"] == 0 and r["local_insts"] == 0, r
        assert r["defects"] == [], r["defects"]
        if r["cc"] >= 90:
            assert r["target"] == f"sm_{r['cc']}a"  # Triton compiles sm_90 as sm_90a
    assert K.check(rows) == []


def test_gemm_shows_tensor_core_instructions(local_rows):
    for cc in (80, 89, 90):
        r = local_rows[("t_gemm", cc)]
        assert r["error"] is None, r["error"]
        assert r["tc_insts"] > 0, r
        assert r["spill_bytes"] == 0
        assert r["smem"] > 0  # operands staged through shared memory
        assert r["defects"] == []
    assert local_rows[("t_gemm", 80)]["HMMA"] > 0
    assert local_rows[("t_gemm", 89)]["HMMA"] > 0
    r90 = local_rows[("t_gemm", 90)]
    assert r90["HGMMA"] + r90["HMMA"] > 0


def test_gemm_without_tensor_cores_is_a_defect(local_rows):
    bad = [local_rows[("t_scale_as_gemm", cc)] for cc in (80, 89, 90)]
    for r in bad:
        assert r["error"] is None and r["tc_insts"] == 0
        assert any("without tensor-core" in d for d in r["defects"])
    assert len([d for d in K.check(bad) if "t_scale_as_gemm" in d]) == 3
    ok = local_rows[("t_scale", 80)]
    assert ok["defects"] == [] and ok["tc_insts"] == 0  # the same kernel, not claimed as a GEMM, is fine
    assert ("t_scale", 89) not in local_rows  # only the targets a spec claims are compiled


def test_a_required_tensor_core_instruction_is_enforced():
    """An FP8 GEMM that compiled to 16-bit tensor cores (an upcast) is a defect, though it has HGMMA."""
    row = K._row(source="triton", kernel="fp8_gemm_kernel", target="sm_90a", gemm=True, requires="QGMMA",
                 HGMMA=4, tc_insts=4)
    assert K.defects(row) == ["triton fp8_gemm_kernel [] on sm_90a: needs QGMMA on this target, SASS shows HGMMA"]
    row.update(QGMMA=4, HGMMA=0)
    assert K.defects(row) == []
    from fusedtune.triton_kernels.registry import all_kernels
    fp8 = [s for s in all_kernels() if s.name == "fp8_gemm_kernel"]
    assert fp8 and fp8[0].requires == {89: "QMMA", 90: "QGMMA"}


def test_spills_and_errors_are_defects():
    row = K._row(source="cuda", kernel="k", target="sm_80", regs=255, spill_bytes=64, stack_bytes=64,
                 local_bytes=0, local_insts=12, tc_insts=0)
    assert any("spills" in d for d in K.defects(row))
    row = K._row(source="triton", kernel="k", target="sm_80", error="compile failed: boom")
    assert K.defects(row) == ["triton k [] on sm_80: compile failed: boom"]


def test_a_kernel_built_for_16_byte_accesses_needs_them_in_its_sass():
    """zo_apply_kernel's 16-byte stores once compiled to four 32-bit stores each: a kernel listed in VECTOR_IO
    whose SASS lacks 128-bit loads or stores is a defect; one that has them, or another kernel, is not."""
    row = dict(source="cuda", kernel="fusedtune::zo::zo_apply_kernel", target="sm_90a", regs=64, spill_bytes=0,
               local_insts=0)
    assert any("no 128-bit stores" in d for d in K.defects(K._row(**row, ldg128=8, stg128=0)))
    assert any("no 128-bit loads or stores" in d for d in K.defects(K._row(**row, ldg128=0, stg128=0)))
    assert K.defects(K._row(**row, ldg128=8, stg128=4)) == []
    assert K.defects(K._row(**{**row, "kernel": "fusedtune::hft::other_kernel"}, ldg128=0, stg128=0)) == []
    had = dict(row, kernel="fusedtune::roste::hadamard_kernel<1, 28, false>")
    assert K.defects(K._row(**had, ldg128=4, stg128=0)) == []      # the factor stage's 16-bit stores


def test_sass_and_res_usage_parsers():
    res = """
Fatbin elf code:
================
arch = sm_90a
Resource usage:
 Function _ZN9fusedtune3fam6kernelEv:
  REG:168 STACK:16 SHARED:5124 LOCAL:0 CONSTANT[0]:600 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert K.parse_res_usage(res) == {("sm_90a", "_ZN9fusedtune3fam6kernelEv"):
                                      {"regs": 168, "stack": 16, "smem_static": 5124, "local": 0}}
    sass = """
\tcode for sm_90a
\t\tFunction : _ZN9fusedtune3fam6kernelEv
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/              @P0  HGMMA.64x64x16.F32 R24, gdesc[UR16].tnspB, R24 ; /* 0x40e00000101879f0 */
        /*0020*/                   QGMMA.64x128x32.F32.E4M3.E4M3 R24, gdesc[UR4], R24 ; /* 0x0 */
        /*0030*/                   STL [R1], R2 ;                         /* 0x0 */
        /*0040*/                   HMMA.16816.F32 R64, R32, R24, R64 ;    /* 0x0 */
        /*0050*/                   IGMMA.64x128x32.S32.S8.S8 R24, gdesc[UR4], R24 ; /* 0x0 */
        /*0060*/              @!P1 LDG.E.128 R4, desc[UR34][R22.64+0x1000] ; /* 0x0 */
        /*0070*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ; /* 0x0 */
        /*0080*/                   STG.E.128 desc[UR34][R2.64], R4 ; /* 0x0 */
        /*0090*/                   STG.E desc[UR34][R2.64], R4 ; /* 0x0 */
"""
    c = K.parse_sass(sass)[("sm_90a", "_ZN9fusedtune3fam6kernelEv")]
    assert (c["HGMMA"], c["QGMMA"], c["HMMA"], c["IMMA"], c["IGMMA"], c["STL"], c["insts"]) == (1, 1, 1, 0, 1, 1, 10)
    assert (c["LDG128"], c["STG128"]) == (2, 1)
    # nvdisasm's form of a Triton cubin (the arch in the ELF header flags, the function as its section's label)
    body = sass.split("Function : _ZN9fusedtune3fam6kernelEv\n", 1)[1]
    for flags, arch in (("EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)", "sm_90a"),
                        ("EF_CUDA_SM89 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM89)", "sm_89")):
        nvd = (f'\t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS {flags}"\n'
               '//--------------------- .text.triton_k   --------------------------\n'
               '\t.section\t.text.triton_k,"ax",@progbits\ntriton_k:\n.text.triton_k:\n' + body)
        assert K.parse_sass(nvd) == {(arch, "triton_k"): c}
    assert K.demangle(["_ZN9fusedtune3fam6kernelEv"]) == {"_ZN9fusedtune3fam6kernelEv": "fusedtune::fam::kernel"}
    assert K._demangle_fallback("_ZN9fusedtune2zo15zo_apply_kernelENS0_6LaunchE") == "fusedtune::zo::zo_apply_kernel"
    assert K._strip_signature("void ns::k<float, 4>(ns::A, int)") == "ns::k<float, 4>"


def test_cubin_rows_are_cached_by_the_librarys_bytes(tmp_path, monkeypatch):
    res = "arch = sm_80\nResource usage:\n Function _ZN9fusedtune2zo1kEv:\n  REG:40 STACK:0 SHARED:0 LOCAL:0\n"
    sass = ("\tcode for sm_80\n\t\tFunction : _ZN9fusedtune2zo1kEv\n"
            "        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;  /* 0x0 */\n")
    calls = []

    def fake_dump(*args):
        calls.append(args)
        return res if "-res-usage" in args else sass

    monkeypatch.setattr(K, "_cuobjdump", fake_dump)
    monkeypatch.setattr(K, "cubin_archs", lambda path: ["sm_80"])
    lib, cache = tmp_path / "lib.so", tmp_path / "cache"
    lib.write_bytes(b"one library")
    first = K._cubin_rows(str(lib), str(cache))
    assert len(calls) == 2 and [(r["kernel"], r["regs"], r["ldg128"]) for r in first] == [("fusedtune::zo::k", 40, 1)]
    copy = tmp_path / "copy.so"                      # the same bytes elsewhere (a wheel's copy): no cuobjdump
    copy.write_bytes(lib.read_bytes())
    assert K._cubin_rows(str(copy), str(cache)) == first and len(calls) == 2
    lib.write_bytes(b"another library")              # other bytes: read again
    res = res.replace("REG:40", "REG:56")
    assert K._cubin_rows(str(lib), str(cache))[0]["regs"] == 56 and len(calls) == 4
    assert K._cubin_rows(str(lib), None)[0]["regs"] == 56 and len(calls) == 6   # no cache: always read


def test_extension_has_all_targets_and_the_zo_kernel(cuda_rows):
    rows, notes = cuda_rows
    archs = K.cubin_archs(_ext.info()["path"])
    for want in ("sm_80", "sm_89", "sm_90a"):
        assert want in archs, f"no {want} cubin in the extension (has {archs})"
    zo = [r for r in rows if "zo_apply_kernel" in r["kernel"]]
    assert {r["target"] for r in zo} >= {"sm_80", "sm_89", "sm_90a"}
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["spill_bytes"] == 0 and r["local_insts"] == 0, r
        assert r["regs"] > 0
    assert K.check(rows) == []


def test_main_prints_table_and_writes_json(tmp_path, capsys, monkeypatch):
    # the registry is compiled by the module fixture already; this exercises the CLI on the local specs
    monkeypatch.setattr("fusedtune.triton_kernels.registry.all_kernels", lambda: [GEMM, FAKE_GEMM])
    out = tmp_path / "k.json"
    rc = K.main(["--json", str(out), "--no-cuda", "--family", "test"])
    text = capsys.readouterr().out
    assert rc == 1  # the fake GEMM is a defect
    assert "t_gemm" in text and "HGMMA" in text and "DEFECT" in text
    data = json.loads(out.read_text())
    assert {r["kernel"] for r in data["rows"]} == {"t_gemm", "t_scale_as_gemm"}
    assert len(data["defects"]) == 3
    monkeypatch.setattr("fusedtune.triton_kernels.registry.all_kernels", lambda: [GEMM])
    assert K.main(["--no-cuda", "--family", "test"]) == 0


def test_report_without_extension(monkeypatch, capsys):
    monkeypatch.setattr(K, "extension_path", lambda: None)
    monkeypatch.setattr("fusedtune.triton_kernels.registry.all_kernels", lambda: [SCALE])
    assert K.main(["--family", "test"]) == 0
    text = capsys.readouterr().out
    assert "fusedtune._C is not built: the report covers the Triton kernels only" in text
    assert "t_scale" in text and "cuda " not in text


def test_row_cache_reuses_compiled_rows_and_keys_on_what_changes_them(tmp_path, monkeypatch):
    """A cached row is the row a compile gives; the key changes with the config, the target and the
    kernel's source; failed compiles are not cached; FUSEDTUNE_KERNEL_CACHE='' turns the cache off."""
    fresh = K.collect_triton([SCALE], cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.json"))) == len(fresh) == 1
    real = K.report_triton_kernel
    monkeypatch.setattr(K, "report_triton_kernel", lambda *a: pytest.fail("compiled although cached"))
    assert K.collect_triton([SCALE], cache_dir=str(tmp_path)) == fresh
    cfg = SCALE.configs[0]
    key = K.row_cache_key(SCALE, cfg, 80)
    assert key != K.row_cache_key(SCALE, cfg, 89)
    assert key != K.row_cache_key(SCALE, dict(cfg, num_warps=8), 80)
    assert key != K.row_cache_key(GEMM, GEMM.configs[0], 80)
    build = K._triton_build_key
    monkeypatch.setattr(K, "_triton_build_key", lambda: build() + "|TRITON_PTXAS_PATH=/other/ptxas")
    assert K.row_cache_key(SCALE, cfg, 80) != key                   # another Triton build / ptxas
    monkeypatch.setattr(K, "_triton_build_key", build)
    # a kernel whose source differs (another function body) gets another key
    assert K.row_cache_key(KernelSpec(family="test", name="t_scale", fn=_t_gemm, targets=(80,),
                                      signature=SCALE.signature, configs=SCALE.configs, options=SCALE.options),
                           cfg, 80) != key
    monkeypatch.setattr(K, "report_triton_kernel", lambda spec, c, cc: dict(real(spec, c, cc), error="boom"))
    other = tmp_path / "other"
    assert K.collect_triton([SCALE], cache_dir=str(other))[0]["error"] == "boom"
    assert not other.exists() or not list(other.glob("*.json"))
    monkeypatch.setenv("FUSEDTUNE_KERNEL_CACHE", "")
    assert K.default_cache_dir() is None
    monkeypatch.setenv("FUSEDTUNE_KERNEL_CACHE", str(tmp_path))
    assert K.default_cache_dir() == str(tmp_path)


def test_uncached_rows_compile_in_worker_processes_alike(monkeypatch):
    """The registry's uncached rows compile in spawned worker processes when there are enough of them: the
    rows are the ones this process compiles, in the same order; specs outside the registry (and few rows)
    compile here."""
    from fusedtune.triton_kernels.registry import all_kernels
    specs = sorted(all_kernels(), key=lambda s: len(s.configs) * len(s.targets))[:2]
    # a worker finds a spec by (module, name, k), not by its place in the registry, whose order across modules
    # is the order this process first imported them in (a fresh worker's differs when other tests came first)
    keys = K._spec_keys(all_kernels())
    assert len(set(keys.values())) == len(keys)
    assert K._spec_keys(list(reversed(all_kernels()))).keys() == keys.keys()
    assert sum(len(s.configs) * len(s.targets) for s in specs) >= 2
    monkeypatch.setattr(K, "_POOL_MIN_ROWS", 2)
    here = K.collect_triton(specs + [SCALE], cache_dir=None, jobs=1)
    compile_here = K.report_triton_kernel

    def only_outside_the_registry(spec, config, cc):   # (this process's; the workers import their own)
        assert spec is SCALE, f"{spec.name} compiled in this process, not in a worker"
        return compile_here(spec, config, cc)
    monkeypatch.setattr(K, "report_triton_kernel", only_outside_the_registry)
    pooled = K.collect_triton(specs + [SCALE], cache_dir=None, jobs=2)
    assert pooled == here and not any(r.get("error") for r in here)


def test_an_empty_report_is_an_error_unless_nothing_was_asked(monkeypatch, capsys):
    """A wrong --family (or no Triton and no extension) compiles nothing: exit 1 naming the families, not a
    silent pass; --no-triton --no-cuda asks for nothing and gets 0."""
    monkeypatch.setattr(K, "extension_path", lambda: None)
    monkeypatch.setattr("fusedtune.triton_kernels.registry.all_kernels", lambda: [SCALE])
    assert K.main(["--family", "tset"]) == 1
    assert "error: no kernel of family 'tset' was compiled (families: test)" in capsys.readouterr().out
    assert K.main(["--no-triton", "--no-cuda"]) == 0


def test_a_library_without_device_code_is_a_note_not_a_defect():
    """An extension built without CUDA kernels (FUSEDTUNE_NO_CUDA=1, a runtime image without nvcc): cuobjdump fails on
    it, and the report flagged a DEFECT (exit 1) instead of its note (found by review)."""
    import os

    import torch
    lib = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    if not os.path.exists(lib):
        pytest.skip("no libc10.so to read")
    notes = []
    assert K.collect_cuda(lib, notes) == []
    assert notes == [f"{lib} holds no cubins (built without CUDA kernels)"]
