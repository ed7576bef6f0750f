"""The ahead-of-time compile report as a test: every Triton kernel configuration the launchers can pick, and every
CUDA source in csrc/cuda, compiles for sm_80 and sm_90 without register spills and within the target's shared
memory; attention kernels in fp16 / bf16 use tensor cores. No GPU needed (triton.compile with a GPUTarget, nvcc).

Results are cached under .cache/compile_report (keyed by source + spec + arch + toolchain), so only the first
run pays for the compiles.
"""
import json

import pytest

from bertfast.kernels import report

KEYS = {"kernel", "config", "arch", "registers", "spill_bytes", "shared_bytes", "tensor_cores"}


@pytest.fixture(scope="module")
def rows():
    return report.collect()


def _describe(r):
    return f"{r['source']} {r['kernel']} [{r['config']}] {r['arch']}: " + "; ".join(report.problems(r))


def test_rows_have_the_report_keys(rows):
    assert rows, "the report found no kernel configurations"
    for r in rows:
        assert KEYS <= set(r), f"row lacks {KEYS - set(r)}: {r}"
        assert r["arch"] in ("sm_80", "sm_90")


def test_every_spec_is_reported_for_every_arch(rows):
    import importlib
    got = {(r["kernel"], r["config"], r["arch"]) for r in rows if r["source"] == "triton"}
    for module in report.KERNEL_MODULES:
        if not (report._KERNELS_DIR / f"{module}.py").exists():
            continue
        for spec in importlib.import_module(f"bertfast.kernels.{module}").aot_specs():
            for arch in spec.archs:
                assert (spec.kernel, spec.config, f"sm_{arch}") in got, f"{module}: {spec.kernel} {spec.config} sm_{arch}"


def test_triton_kernels_compile_without_spills(rows):
    bad = [_describe(r) for r in rows if r["source"] == "triton" and report.problems(r)]
    assert not bad, f"{len(bad)} Triton configurations fail:\n" + "\n".join(bad[:40])


def test_tensor_cores_where_required(rows):
    needed = [r for r in rows if r["source"] == "triton" and r.get("needs_tensor_cores")]
    missing = [_describe(r) for r in needed if not r["tensor_cores"]]
    assert not missing, "\n".join(missing)
    # the row kernels are memory bound: no tensor cores expected, and none reported
    for r in rows:
        if r["kernel"].startswith(("add_layer_norm", "bias_act", "dropout_keep")):
            assert r["tensor_cores"] is False, _describe(r)


def test_cuda_sources_compile_without_spills(rows):
    sources = report._cuda_sources()
    cuda_rows = [r for r in rows if r["source"] == "cuda"]
    if not sources:
        assert not cuda_rows
        return
    assert report.find_nvcc() is not None, "nvcc not found (PATH, CUDA_HOME, /usr/local/cuda/bin): CUDA sources " \
                                           "cannot be checked"
    for src in sources:
        name = src.rsplit("/", 1)[-1]
        for arch in ("sm_80", "sm_90"):
            mine = [r for r in cuda_rows if r["config"] == name and r["arch"] == arch]
            assert mine, f"no report rows for {name} {arch}"
    bad = [_describe(r) for r in cuda_rows if report.problems(r)]
    assert not bad, f"{len(bad)} CUDA kernels fail:\n" + "\n".join(bad)


def test_cli_json(rows, capsys):
    """`bertfast compile-report --json --kernel NAME` prints one JSON object per line; exit status 0 when clean
    (served from the cache the fixture filled)."""
    rc = report.main(["--json", "--kernel", "add_layer_norm_fwd", "--arch", "80,90"])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.strip()]
    parsed = [json.loads(l) for l in lines]
    assert parsed and all(KEYS <= set(p) for p in parsed)
    assert {p["arch"] for p in parsed} == {"sm_80", "sm_90"}
    assert all(p["kernel"] == "add_layer_norm_fwd" for p in parsed)
    assert rc == 0


def test_cli_table(rows, capsys):
    rc = report.main(["--kernel", "dropout_keep_mask", "--arch", "90"])
    out = capsys.readouterr().out
    assert "dropout_keep_mask" in out and "sm_90" in out and "sm_80" not in out.split("\n", 2)[2]
    assert rc == 0


def test_problems_are_detected():
    ok = dict(kernel="k", config="c", arch="sm_80", registers=64, spill_bytes=0, shared_bytes=1024,
              tensor_cores=False, needs_tensor_cores=False, error=None, source="triton")
    assert report.problems(ok) == []
    assert report.problems(dict(ok, spill_bytes=8))
    assert report.problems(dict(ok, shared_bytes=164 * 1024))
    assert not report.problems(dict(ok, arch="sm_90", shared_bytes=164 * 1024))
    assert report.problems(dict(ok, arch="sm_90", shared_bytes=228 * 1024))
    assert report.problems(dict(ok, needs_tensor_cores=True))
    assert report.problems(dict(ok, error="boom"))


def test_ptxas_log_parsing():
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 360 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barv' for 'sm_80'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 8 registers, used 0 barriers, 352 bytes cmem[0]
"""
    funcs = report._parse_ptxas(log)
    assert funcs["_Z3fooPf"] == dict(registers=40, spill_bytes=4, shared_bytes=2048, arch="sm_80")
    assert funcs["_Z3barv"] == dict(registers=8, spill_bytes=0, shared_bytes=0, arch="sm_80")
