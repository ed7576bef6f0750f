"""Throws bertfast._C's input errors several times in one process, on the CPU and (when present) CUDA.

On the H100 machine every TORCH_CHECK thrown from bertfast._C after the first one segfaulted (2026-11-24,
torch 2.11.0+cu130, gcc 13, glibc 2.39); the same build of the same torch on a GPU-less Debian machine (gcc 12)
throws them all cleanly. The GPU suite runs this under cuda-gdb so that a crash leaves a native backtrace in
its log. Prints one line per attempt; exit 0 when every error arrived as a RuntimeError naming the op.

Found on the H200 machine (2026-11-26; there the first throw crashed): that backtrace ended in a copy of the C++
runtime inside bertfast/_C*.so (std::codecvt, ostream::_M_insert<long>), linked statically by the image's
/opt/gcc/bin/g++, beside torch's libstdc++.so.6; formatting the first number into an error message crashed.
setup.py now names the shared libstdc++.so.6 on the link line, and the report below says which runtime the
extension carries.

    python -m benchmarks.exception_probe              every bertfast._C error, twice, in this process
    python -m benchmarks.exception_probe --isolate    first the variants below, each in its own process
    python -m benchmarks.exception_probe --variant NAME

The variants split what the one crash could not: whether torch's own errors crash too (a process-wide unwinder
fault, not this extension), and whether the crash needs Triton imported, CUDA initialised or the CUDA ops. Each
loads bertfast/_C*.so with torch.ops.load_library, without importing the bertfast package (which imports Triton
and transformers), unless the variant says otherwise. --isolate also prints the compilers that built the
extension and torch, and the unwinder / C++ runtime libraries the process has loaded.
"""
import faulthandler
import glob
import os
import re
import subprocess
import sys

import torch

faulthandler.enable()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _extension_path():
    import importlib.machinery
    names = [os.path.join(ROOT, "bertfast", "_C" + suffix) for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = [p for p in names if os.path.exists(p)] or sorted(glob.glob(os.path.join(ROOT, "bertfast", "_C*.so")))
    if not found:
        raise SystemExit(f"exception probe: no bertfast/_C*.so under {ROOT} (build it first)")
    return found[0]


def _load_extension():
    torch.ops.load_library(_extension_path())
    return torch.ops.bertfast_C


def _has_cuda_ops(ops):
    return torch.cuda.is_available() and ops.built_with_cuda()


def extension_attempts(ops, device):
    x = torch.randn(4, 8, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    yield "unpad index 4 of 4 rows", "bertfast_C::", lambda: ops.unpad(x, torch.tensor([0, 4], device=device))
    yield "add_layer_norm 1-D x", "bertfast_C::", lambda: ops.add_layer_norm(x[0], w, b, 1e-5, None, None, "")
    yield ("add_layer_norm bad activation", "bertfast_C::",
           lambda: ops.add_layer_norm(x, w, b, 1e-5, None, None, "tanh"))
    yield "pad n_rows -1", "bertfast_C::", lambda: ops.pad(x, torch.arange(4, device=device), -1)


def torch_attempts(device):
    """Errors thrown by torch's own TORCH_CHECKs (libc10 / libtorch), no extension involved."""
    x = torch.randn(4, 8, device=device)
    yield "aten view 32 elements as 3", "shape", lambda: x.view(3)
    yield "aten mm of [4, 8] and [4, 8]", "mat", lambda: torch.mm(x, x)


def run_attempts(attempts, rounds=2):
    """Each attempt `rounds` times; returns how many did not raise a RuntimeError holding their marker."""
    attempts = list(attempts)
    bad = 0
    for round_ in range(rounds):
        for name, marker, fn in attempts:
            print(f"  round {round_} {name}: ", end="", flush=True)
            try:
                fn()
                print("NO ERROR RAISED")
                bad += 1
            except RuntimeError as e:
                ok = marker in str(e)
                bad += not ok
                print("ok" if ok else f"unexpected message: {str(e)[:200]}", flush=True)
    return bad


def _variant_torch():
    return run_attempts(torch_attempts("cpu"), rounds=3)


def _variant_ext_cpu():
    return run_attempts(extension_attempts(_load_extension(), "cpu"))


def _variant_ext_cpu_after_triton():
    import triton  # noqa: F401  (loads libtriton and its LLVM)
    return run_attempts(extension_attempts(_load_extension(), "cpu"))


def _variant_ext_cpu_after_cuda_init():
    ops = _load_extension()
    if torch.cuda.is_available():
        torch.cuda.init()
        torch.ones(1, device="cuda").sum().item()
    return run_attempts(extension_attempts(ops, "cpu"))


def _variant_ext_cuda():
    ops = _load_extension()
    if not _has_cuda_ops(ops):
        print("  no CUDA build or no GPU: nothing to throw")
        return 0
    return run_attempts(extension_attempts(ops, "cuda"))


def _variant_torch_after_ext():
    """One extension error, then torch's own: does a throw from the extension break later throws anywhere?"""
    bad = run_attempts(extension_attempts(_load_extension(), "cpu"), rounds=1)
    return bad + run_attempts(torch_attempts("cpu"), rounds=2)


def _variant_bertfast():
    """The whole package imported (Triton, transformers), CPU and CUDA errors: the suite's situation."""
    import bertfast  # noqa: F401
    import bertfast._C  # noqa: F401  (the package loads it lazily)
    ops = torch.ops.bertfast_C
    bad = run_attempts(extension_attempts(ops, "cpu"))
    if _has_cuda_ops(ops):
        bad += run_attempts(extension_attempts(ops, "cuda"))
        torch.cuda.synchronize()
    return bad


VARIANTS = {
    "torch": _variant_torch,
    "ext-cpu": _variant_ext_cpu,
    "ext-cpu-after-triton": _variant_ext_cpu_after_triton,
    "ext-cpu-after-cuda-init": _variant_ext_cpu_after_cuda_init,
    "ext-cuda": _variant_ext_cuda,
    "torch-after-ext": _variant_torch_after_ext,
    "bertfast": _variant_bertfast,
}


def _readelf_comment(path):
    try:
        out = subprocess.run(["readelf", "-p", ".comment", path], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"(readelf: {e})"
    found = sorted(set(re.findall(r"\]\s+(.*)", out.stdout)))
    return "; ".join(found) or "(no .comment section)"


def cxx_runtime_of(path):
    """(NEEDED libstdc++?, names of C++ runtime internals the object defines itself) for a shared object, from
    readelf and nm. A copy of libstdc++ linked into the extension (defined std::locale members) beside the
    process's libstdc++.so.6 crashes the first TORCH_CHECK message that formats a number (2026-11-26, H200)."""
    dyn = subprocess.run(["readelf", "-d", path], capture_output=True, text=True, timeout=60).stdout
    # the symbol table, and the dynamic one (all a stripped object keeps; a static runtime's symbols are exported)
    syms = "".join(subprocess.run(["nm", *flag, "--defined-only", path], capture_output=True, text=True,
                                  timeout=120).stdout for flag in ([], ["-D"]))
    # strong definitions only: an inline member the compiler emitted as a weak symbol is no copy of the runtime
    own = sorted({parts[2] for parts in map(str.split, syms.splitlines()) if len(parts) == 3
                  and parts[1] in "TtDdBbRr" and re.match(r"_ZNSt6locale|_ZNKSt7codecvt|_ZNSo9_M_insert", parts[2])})
    return "libstdc++.so" in dyn, own


def environment_report():
    """The compilers behind the extension and torch, and the runtime libraries an exception unwinds through."""
    so = _extension_path()
    print(f"extension {so}\n  built by: {_readelf_comment(so)}")
    try:
        needed, own = cxx_runtime_of(so)
        print(f"  C++ runtime: {'needs libstdc++.so' if needed else 'does NOT need libstdc++.so'}; "
              + (f"defines {len(own)} of its internals itself (a static copy), e.g. {own[0]}" if own
                 else "defines none of its internals (shares the process's)"))
    except (OSError, subprocess.SubprocessError) as e:
        print(f"  C++ runtime: (readelf / nm failed: {e})")
    compiler = [line.strip() for line in torch.__config__.show().splitlines() if "C++ Version" in line
                or "GCC" in line or "clang" in line.lower()]
    print(f"torch {torch.__version__}: {'; '.join(compiler[:3]) or '(compiler not stated)'}")
    code = ("import torch, sys; sys.path.insert(0, %r); import bertfast, bertfast._C, triton, re; "
            "libs = sorted({l.split()[-1] for l in open('/proc/self/maps') if len(l.split()) > 5}); "
            "pat = re.compile(r'gcc_s|stdc\\+\\+|unwind|gomp|omp|c10\\.so|cublas|triton|libc\\.so'); "
            "print('\\n'.join('  ' + l for l in libs if pat.search(l)))") % ROOT
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    print("libraries loaded after `import bertfast` (unwinders, C++ / OpenMP runtimes, c10, cuBLAS, Triton):")
    print(out.stdout.rstrip() or f"  (failed: {out.stderr.strip()[-300:]})")


def _variant_command(name):
    return [sys.executable, "-m", "benchmarks.exception_probe", "--variant", name]


def isolate(names=tuple(VARIANTS), command=_variant_command):
    """Each variant in its own process; 0 when all passed, 139 when one died of a signal (named on the line
    "first crashed variant: NAME", which the GPU suite reads), else 1."""
    environment_report()
    results = {}
    for name in names:
        print(f"variant {name}:", flush=True)
        rc = subprocess.run(command(name), cwd=ROOT, timeout=300).returncode
        results[name] = "ok" if rc == 0 else (f"died of signal {-rc}" if rc < 0 else f"exit {rc}")
    print("exception probe variants: " + ", ".join(f"{k} {v}" for k, v in results.items()))
    crashed = [k for k, v in results.items() if v.startswith("died")]
    if crashed:
        print(f"first crashed variant: {crashed[0]} (rerun: python -m benchmarks.exception_probe --variant "
              f"{crashed[0]})")
        return 128 + 11
    return 0 if all(v == "ok" for v in results.values()) else 1


def main(argv):
    if argv[:1] == ["--isolate"]:
        return isolate()
    if argv[:1] == ["--variant"] and len(argv) == 2:
        if argv[1] not in VARIANTS:
            raise SystemExit(f"--variant: expected one of {', '.join(VARIANTS)}, got {argv[1]!r}")
        bad = VARIANTS[argv[1]]()
        print(f"variant {argv[1]}: {'OK' if not bad else f'{bad} FAILED'}", flush=True)
        return 1 if bad else 0
    if argv:
        raise SystemExit("usage: python -m benchmarks.exception_probe [--isolate | --variant NAME]")
    bad = _variant_bertfast()
    print(f"exception probe: {'OK' if not bad else f'{bad} FAILED'}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
