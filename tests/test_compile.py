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


_LAUNCH_SCRIPT = r"""
import json, os
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature
from bertfast.kernels import attention, gelu, layer_norm, report

launches = []
def capture(self, *args, grid, warmup, **kwargs):   # record the launch instead of running it (no GPU here)
    launches.append((self, args, kwargs))
JITFunction.run = capture

T, H, D, W = 1000, 12, 64, 768
cu = torch.tensor([0, 500, 997, T], dtype=torch.int32)
for dtype in (torch.float16, torch.float32):
    qkv = torch.randn(T, 3, H, D, dtype=dtype)
    out, lse = attention.attention_forward(qkv, cu, 500, fp32_precision="ieee", dropout_p=0.1, seed=3)
    attention.attention_backward(torch.randn_like(out), qkv, out, lse, cu, 500, fp32_precision="ieee",
                                 dropout_p=0.1, seed=3)
    x, w = torch.randn(T, W, dtype=dtype), torch.randn(W, dtype=dtype)
    y, mean, rstd = layer_norm.add_layer_norm_forward(x, w, w, 1e-5, residual=x, x_bias=w, activation="gelu")
    layer_norm.add_layer_norm_backward(y, x, w, w, mean, rstd, residual=x, x_bias=w, activation="gelu")
    u, b = torch.randn(T, 4 * W, dtype=dtype), torch.randn(4 * W, dtype=dtype)
    gelu.bias_act_forward(u, b, "gelu")
    gelu.bias_act_backward(u, u, b, "gelu")

backend = make_backend(GPUTarget("cuda", 90, 32))
result = []
for fn, args, kwargs in launches:
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    _, signature, _, attrs = fn._pack_args(backend, kwargs, bound, spec, options)
    runtime = sorted(fn.arg_names[k[0]] for k, v in attrs.items() if ["tt.divisibility", 16] in v)
    types = {n: ("*" if isinstance(a, torch.Tensor) else "i32") for n, a in zip(fn.arg_names, args)}
    class Spec: pass
    s = Spec(); s.signature = types
    result.append(dict(kernel=fn.__name__, runtime=runtime, report=sorted(report.divisible_args(s))))
print("LAUNCHES=" + json.dumps(result))
"""

# sizes that change with the batch: a launch may find them divisible by 16, the report compiles them unspecialised
# (n_cols, the row kernels' hidden size, both ways: see report._triton_job)
_VALUE_DEPENDENT = {"n_tokens", "n_rows", "n_cols", "numel", "max_seqlen", "rows_per_program", "n_row_tiles",
                    "n_programs_m", "stride_lse_h", "stride_delta_h"}


def test_report_compiles_the_variant_launches_compile():
    """The report's divisibility (report.divisible_args) against Triton's own binder on real launches of every
    kernel (BERT-base shapes, fp16 and fp32, dropout on): every pointer and stride a launch specialises is
    specialised in the report too, and the report specialises nothing a launch does not. The report once compiled
    a variant that never runs, whose registers hid spills of up to 1.5 KB."""
    import os
    import subprocess
    import sys
    # every launch through JITFunction.run (kernels/launch.py's cache off), which the script records
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["BERTFAST_LAUNCH_CACHE"] = "0"
    res = subprocess.run([sys.executable, "-c", _LAUNCH_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=600, cwd=str(report._ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    launches = json.loads(res.stdout.split("LAUNCHES=")[1])
    kernels = {launch["kernel"] for launch in launches}
    assert {"_attn_fwd_kernel", "_attn_bwd_preprocess_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel",
            "_add_ln_fwd_kernel", "_add_ln_bwd_kernel", "_bias_act_fwd_kernel", "_bias_act_bwd_kernel"} <= kernels, \
        kernels
    for launch in launches:
        runtime, ours = set(launch["runtime"]), set(launch["report"])
        assert ours <= runtime, (launch["kernel"], sorted(ours - runtime))
        assert runtime - ours <= _VALUE_DEPENDENT, (launch["kernel"], sorted(runtime - ours))
