"""The ahead-of-time compile report: every kernel configuration the launchers can pick, compiled for real GPU
targets on a machine without a GPU.

Triton kernels: each ``KernelSpec`` from ``aot_specs()`` of bertfast.kernels.attention / layer_norm / gelu (those
that exist) is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for every arch
in ``spec.archs``; registers and spill bytes come from the bundled ``ptxas -v`` run on the PTX, shared memory
from ``metadata.shared``, tensor-core use from ``cuobjdump --dump-sass`` of the cubin (HMMA / HGMMA).
CUDA sources: every ``csrc/cuda/*.cu`` is compiled with ``nvcc -c ... -Xptxas -v`` per arch, one row per kernel
function (static shared memory only: dynamic shared memory is a launch parameter).

Compiles run in a small process pool (spawned with TRITON_INTERPRET unset, so the workers see real @triton.jit
functions even when the caller runs under the interpreter) and their results are cached as JSON under
``<project>/.cache/compile_report``, keyed by a hash of the kernel module sources (and the kernel modules they
import), the spec, the arch and the toolchain versions, so a repeat run is fast.

Command line: ``bertfast compile-report [--json] [--arch 80,90] [--kernel NAME] [--no-cache] [--jobs N]``; exits 1
when any configuration fails to compile, spills, exceeds the target's shared memory or lacks required tensor
cores.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile

KERNEL_MODULES = ("attention", "layer_norm", "gelu")
ARCHS = (80, 90)
# shared memory a block may use (opt-in maximum): sm_80 163 KB, sm_90 227 KB
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
REPORT_VERSION = "6"

_KERNELS_DIR = pathlib.Path(__file__).resolve().parent
_ROOT = _KERNELS_DIR.parent
_CUDA_DIR = _ROOT / "csrc" / "cuda"


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("BERTFAST_COMPILE_CACHE", _ROOT / ".cache" / "compile_report"))


# ---------------------------------------------------------------------------------------------------------------
# tools


def _triton_nvidia_bin(name: str) -> str:
    import triton
    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in triton's bundled CUDA tools ({path})")
    return str(path)


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return os.path.join(home, "bin", "nvcc")
    return None


def _cuobjdump() -> str:
    nvcc = find_nvcc()
    if nvcc:
        cand = os.path.join(os.path.dirname(nvcc), "cuobjdump")
        if os.path.exists(cand):
            return cand
    return shutil.which("cuobjdump") or _triton_nvidia_bin("cuobjdump")


_TC_RE = re.compile(r"\b(HMMA|HGMMA|IMMA|QGMMA|UTCHMMA|UTCQMMA)\b")


def _sass_functions(sass: str) -> dict:
    """{(function name, "sm_XX"): whether its SASS has tensor-core instructions} from cuobjdump --dump-sass."""
    out, name, arch = {}, None, None
    for line in sass.splitlines():
        m = re.match(r"\s*arch\s*=\s*(sm_\w+)", line)
        if m:
            arch, name = m.group(1), None
            continue
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            name = (m.group(1), arch)
            out.setdefault(name, False)
        elif name and _TC_RE.search(line):
            out[name] = True
    return out


def _parse_ptxas(log: str) -> dict:
    """{mangled function: {registers, spill_bytes, shared_bytes, arch}} from ptxas -v output."""
    funcs, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\w+)'", line)
        if m:
            arch = m.group(2)
            cur = funcs.setdefault(m.group(1), dict(registers=None, spill_bytes=0, shared_bytes=0, arch=arch))
            if cur["arch"] != arch:  # the same function for a second arch (one nvcc run, several -gencode)
                cur = funcs.setdefault(f"{m.group(1)}@{arch}",
                                       dict(registers=None, spill_bytes=0, shared_bytes=0, arch=arch))
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            cur["spill_bytes"] = max(int(m.group(1)), int(m.group(2)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            cur["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            cur["shared_bytes"] = int(m.group(1))
    return funcs


# ---------------------------------------------------------------------------------------------------------------
# jobs (run in worker processes)


def _worker_init():
    # the workers must see real @triton.jit functions: TRITON_INTERPRET must be unset before the kernel modules
    # are imported (they are imported here for the first time in this process)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_CACHE_DIR", str(_ROOT / ".cache" / "triton"))
    # import the kernel modules now, right after the parent listed their specs, so both see the same sources
    # even when a file is edited while a long report runs
    import importlib
    for module in KERNEL_MODULES:
        if (_KERNELS_DIR / f"{module}.py").exists():
            try:
                importlib.import_module(f"bertfast.kernels.{module}")
            except Exception:  # reported by the job that needs it
                pass


def divisible_args(spec) -> list:
    """The arguments the report compiles as multiples of 16 (Triton's tt.divisibility), as a launch from
    bertfast's launchers specialises them: every pointer (torch's allocations are 16-byte aligned) and the
    strides of qkv / out / dout / dqkv (multiples of head_dim, and every supported head dim is a multiple of 16).
    Sizes that change with the batch (tokens, rows) and the lse / delta head strides (the token count) stay
    unspecialised, so one compile covers every batch; the row kernels' n_cols (the model's hidden size) is
    compiled both ways by _triton_job. The report once compiled no divisibility at all: a variant that never
    runs, which hid spills of the one that does (tests/test_compile.py checks this rule against Triton's own
    binder on real launches)."""
    return [name for name, ty in spec.signature.items()
            if ty.startswith("*") or (name.startswith("stride_") and not name.endswith(("_lse_h", "_delta_h")))]


def _compile_variant(spec, arch: int, divisible: list) -> dict:
    """One triton.compile of spec for arch with tt.divisibility 16 on the named arguments: registers and spill bytes
    (ptxas -v), shared memory, and whether the SASS holds tensor-core instructions."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # triton runs ptxas -v itself: keep its log (always compile: this report has its own cache) instead of
    # assembling the PTX a second time
    triton.knobs.compilation.always_compile = True
    triton.knobs.nvidia.dump_ptxas_log = True
    names = list(spec.fn.arg_names)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                                            attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages))
    out = dict(shared_bytes=int(compiled.metadata.shared))
    ptx = compiled.asm["ptx"]
    funcs = _parse_ptxas(log.getvalue())
    with tempfile.TemporaryDirectory(prefix="bertfast-aot-") as tmp:
        if len(funcs) != 1 or next(iter(funcs.values()))["registers"] is None:
            target = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M).group(1)
            ptx_path = os.path.join(tmp, "k.ptx")
            with open(ptx_path, "w") as f:
                f.write(ptx)
            res = subprocess.run([_triton_nvidia_bin("ptxas"), "-v", f"--gpu-name={target}", ptx_path, "-o",
                                  os.path.join(tmp, "k.o")], capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-2000:]}")
            funcs = _parse_ptxas(res.stderr)
        if len(funcs) != 1:
            raise RuntimeError(f"expected one entry function in ptxas output, got {list(funcs)}")
        info = next(iter(funcs.values()))
        out["registers"], out["spill_bytes"] = info["registers"], info["spill_bytes"]
        # tensor-core SASS comes only from PTX mma / wgmma: disassemble only kernels whose PTX has them
        if re.search(r"^\s*(@\S+\s+)?(mma|wgmma)\.", ptx, re.M):
            cubin_path = os.path.join(tmp, "k.cubin")
            with open(cubin_path, "wb") as f:
                f.write(compiled.asm["cubin"])
            sass = subprocess.run([_cuobjdump(), "--dump-sass", cubin_path], capture_output=True, text=True)
            if sass.returncode != 0:
                raise RuntimeError(f"cuobjdump failed: {sass.stderr.strip()[-2000:]}")
            out["tensor_cores"] = bool(_TC_RE.search(sass.stdout))
        else:
            out["tensor_cores"] = False
    return out


def _triton_job(module: str, kernel: str, config: str, arch: int) -> dict:
    row = dict(kernel=kernel, config=config, arch=f"sm_{arch}", registers=None, spill_bytes=None,
               shared_bytes=None, tensor_cores=None, source="triton", error=None)
    try:
        import importlib

        mod = importlib.import_module(f"bertfast.kernels.{module}")
        matches = [s for s in mod.aot_specs() if s.kernel == kernel and s.config == config and arch in s.archs]
        if len(matches) != 1:
            raise LookupError(f"{len(matches)} specs named {kernel!r} / {config!r} for sm_{arch} in {module} (did "
                              f"{module}.py change while the report ran? run it again)")
        spec = matches[0]
        # the row kernels' hidden size is a multiple of 16 for most models (768, 1024, ...) and not for some
        # (312, 1023): a launch compiles one variant or the other, so both are compiled and the worse is reported
        base = divisible_args(spec)
        variants = [base] + ([base + ["n_cols"]] if "n_cols" in spec.signature else [])
        results = [_compile_variant(spec, arch, v) for v in variants]
        worst = max(results, key=lambda r: (r["spill_bytes"] or 0, r["registers"] or 0))
        row.update(registers=worst["registers"], spill_bytes=worst["spill_bytes"],
                   shared_bytes=max(r["shared_bytes"] for r in results),
                   tensor_cores=all(r["tensor_cores"] for r in results))
        row["needs_tensor_cores"] = bool(spec.tensor_cores)
    except Exception as exc:  # the report records the failure; main() turns it into a non-zero exit
        row["error"] = f"{type(exc).__name__}: {exc}"[-4000:]
    return row


def _demangle(names):
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        out = res.stdout.splitlines()
        if res.returncode == 0 and len(out) == len(names):
            return dict(zip(names, out))
    except OSError:
        pass
    return {n: n for n in names}


def _short_name(demangled: str) -> str:
    """'void bertfast::embed_kernel<float>(float const*, ...)' -> 'bertfast::embed_kernel<float>'."""
    name = demangled.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    if name.startswith("void "):
        name = name[5:]
    return name


def _nvcc_job(cu_file: str, archs: tuple, flags: list) -> list:
    """One nvcc -c run with a -gencode per arch (the host side, most of the time, is compiled once); one row per
    (kernel function, arch) from ptxas -v, tensor cores from cuobjdump --dump-sass of the object."""
    name = os.path.basename(cu_file)
    try:
        with tempfile.TemporaryDirectory(prefix="bertfast-nvcc-") as tmp:
            obj = os.path.join(tmp, "k.o")
            gencode = [f for a in archs for f in ("-gencode", f"arch=compute_{a},code=sm_{a}")]
            cmd = [find_nvcc(), "-c", cu_file, "-o", obj, *flags, *gencode, "-Xptxas", "-v"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{(res.stderr + res.stdout).strip()[-3000:]}")
            funcs = _parse_ptxas(res.stderr + res.stdout)
            sass = subprocess.run([_cuobjdump(), "--dump-sass", obj], capture_output=True, text=True)
            tc = _sass_functions(sass.stdout) if sass.returncode == 0 else {}
        mangled_names = sorted({k.split("@")[0] for k in funcs})
        names = _demangle(mangled_names)
        rows = []
        for key, info in funcs.items():
            mangled = key.split("@")[0]
            rows.append(dict(kernel=_short_name(names[mangled]), config=name, arch=info["arch"],
                             registers=info["registers"], spill_bytes=info["spill_bytes"],
                             shared_bytes=info["shared_bytes"], tensor_cores=tc.get((mangled, info["arch"]), False),
                             source="cuda", needs_tensor_cores=False, error=None))
        for arch in archs:
            if not any(r["arch"] == f"sm_{arch}" for r in rows):
                rows.append(dict(kernel="(no kernels)", config=name, arch=f"sm_{arch}", registers=None,
                                 spill_bytes=0, shared_bytes=0, tensor_cores=False, source="cuda",
                                 needs_tensor_cores=False, error=None))
        return sorted(rows, key=lambda r: (r["arch"], r["kernel"]))
    except Exception as exc:
        return [dict(kernel=name, config=name, arch=f"sm_{a}", registers=None, spill_bytes=None, shared_bytes=None,
                     tensor_cores=None, source="cuda", needs_tensor_cores=False,
                     error=f"{type(exc).__name__}: {exc}"[-4000:]) for a in archs]


# ---------------------------------------------------------------------------------------------------------------
# job lists and cache keys (parent process)


def _sha(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else str(p).encode())
        h.update(b"\0")
    return h.hexdigest()


def _module_source_hash(module: str, seen=None) -> str:
    """Hash of the module's source and of the sources of the kernel modules it imports (helpers, config)."""
    seen = set() if seen is None else seen
    if module in seen:
        return ""
    seen.add(module)
    path = _KERNELS_DIR / f"{module}.py"
    text = path.read_text()
    deps = sorted(set(re.findall(r"bertfast\.kernels\.(\w+)", text)) | set(re.findall(r"from \.(\w+) import", text)))
    parts = [text] + [_module_source_hash(d, seen) for d in deps
                      if d != module and (_KERNELS_DIR / f"{d}.py").exists()]
    return _sha(*parts)


def _toolchain_key() -> str:
    import triton
    return f"triton {triton.__version__} report {REPORT_VERSION}"


def _triton_jobs(archs, kernel_filter):
    import importlib
    jobs = []
    for module in KERNEL_MODULES:
        if not (_KERNELS_DIR / f"{module}.py").exists():
            continue
        mod = importlib.import_module(f"bertfast.kernels.{module}")
        if not hasattr(mod, "aot_specs"):
            continue
        src = _module_source_hash(module)
        for spec in mod.aot_specs():
            if kernel_filter and kernel_filter not in spec.kernel:
                continue
            for arch in spec.archs:
                if arch not in archs:
                    continue
                key = _sha(_toolchain_key(), src, spec.kernel, spec.config, sorted(spec.signature.items()),
                           sorted((k, repr(v)) for k, v in spec.constexprs.items()), spec.num_warps,
                           spec.num_stages, spec.tensor_cores, arch)
                jobs.append((key, _triton_job, (module, spec.kernel, spec.config, arch)))
    return jobs


def _cuda_sources():
    return sorted(str(p) for p in _CUDA_DIR.glob("*.cu"))


def cublas_include_dir(download: bool = True) -> str | None:
    """The include/ folder of the nvidia-cublas wheel (cuBLAS headers, missing from this toolkit), extracted
    once under <project>/.cache/cublas; downloaded with pip the first time it is needed."""
    root = _ROOT / ".cache" / "cublas"
    for hdr in sorted(root.glob("**/include/cublasLt.h")):
        return str(hdr.parent)
    if not download:
        return None
    wheels = root / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    if not list(wheels.glob("nvidia_cublas*.whl")):
        res = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                              "-d", str(wheels), "nvidia-cublas"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"pip download nvidia-cublas failed: {res.stderr.strip()[-2000:]}")
    wheel = sorted(wheels.glob("nvidia_cublas*.whl"))[-1]
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if "/include/" in name and not name.endswith("/"):
                zf.extract(name, root / "extracted")
    wheel.unlink()  # only include/ is kept
    for hdr in sorted(root.glob("**/include/cublasLt.h")):
        return str(hdr.parent)
    raise RuntimeError(f"no include/cublasLt.h in {wheel.name}")


def _needs_cublas(text: str) -> bool:
    return bool(re.search(r"#\s*include\s*[<\"](cublas\w*\.h|ATen/cuda/CUDAContext\.h|ATen/cuda/CUDABlas\.h)", text))


def cxx_standard() -> str:
    """The -std that torch's cpp_extension gives an extension that names none (setup.py names none): c++20 where
    the installed torch's default is C++20 (2.13 and later), else c++17."""
    import inspect

    import torch.utils.cpp_extension as ext
    return "-std=c++20" if "'c++20'" in inspect.getsource(ext) else "-std=c++17"


def _nvcc_flags(needs_cublas: bool) -> list:
    import torch.utils.cpp_extension as ext
    flags = [cxx_standard(), "--expt-relaxed-constexpr", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", "-DBERTFAST_WITH_CUDA"]
    # no host -O: the host side only has to compile here (device code is optimised by ptxas regardless, and its
    # registers / spills are what the report reads); host optimisation of the ATen headers was most of the time
    for inc in ext.include_paths():
        flags.append(f"-I{inc}")
    flags.append(f"-I{sysconfig.get_paths()['include']}")
    flags.append(f"-I{_ROOT / 'csrc'}")
    if needs_cublas:
        flags.append(f"-I{cublas_include_dir()}")
    return flags


def _nvcc_version() -> str:
    try:
        return subprocess.run([find_nvcc(), "--version"], capture_output=True, text=True).stdout.strip()
    except (OSError, TypeError):
        return "none"


def _cuda_jobs(archs, kernel_filter):
    sources = _cuda_sources()
    if not sources:
        return []
    if find_nvcc() is None:
        return [(None, None, dict(kernel=os.path.basename(s), config=os.path.basename(s), arch=f"sm_{a}",
                                  registers=None, spill_bytes=None, shared_bytes=None, tensor_cores=None,
                                  source="cuda", needs_tensor_cores=False,
                                  error="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda/bin)"))
                for s in sources for a in archs]
    headers = sorted(str(p) for p in list((_ROOT / "csrc").glob("*.h")) + list(_CUDA_DIR.glob("*.h"))
                     + list(_CUDA_DIR.glob("*.cuh")))
    header_text = "".join(pathlib.Path(h).read_text() for h in headers)
    nvcc_version = _nvcc_version()
    jobs = []
    for src in sources:
        if kernel_filter and kernel_filter not in os.path.basename(src):
            continue
        text = pathlib.Path(src).read_text()
        try:
            flags = _nvcc_flags(_needs_cublas(text + header_text))
        except Exception as exc:
            for arch in archs:
                jobs.append((None, None, dict(kernel=os.path.basename(src), config=os.path.basename(src),
                                              arch=f"sm_{arch}", registers=None, spill_bytes=None, shared_bytes=None,
                                              tensor_cores=None, source="cuda", needs_tensor_cores=False,
                                              error=f"{type(exc).__name__}: {exc}")))
            continue
        # flags hold absolute include paths: hash them without the machine-specific prefix
        key = _sha(REPORT_VERSION, nvcc_version, text, header_text, [f for f in flags if not f.startswith("-I")],
                   archs)
        jobs.append((key, _nvcc_job, (src, archs, flags)))
    return jobs


# ---------------------------------------------------------------------------------------------------------------
# running


def _cache_get(key):
    if key is None:
        return None
    path = cache_dir() / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _cache_put(key, value):
    if key is None:
        return
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(value))
    os.replace(tmp, d / f"{key}.json")


def _as_rows(result):
    return result if isinstance(result, list) else [result]


def collect(archs=ARCHS, kernel: str | None = None, use_cache: bool = True, jobs: int | None = None,
            cuda: bool = True) -> list[dict]:
    """Compile every configuration (Triton specs and csrc/cuda/*.cu) for each arch; one dict per (kernel, config,
    arch): {"kernel", "config", "arch" ("sm_80"/"sm_90"), "registers", "spill_bytes", "shared_bytes",
    "tensor_cores", "source" ("triton"/"cuda"), "needs_tensor_cores", "error" (None when it compiled)}.
    Failed compiles are reported (``error``), never cached."""
    archs = tuple(int(a) for a in archs)
    work = _cuda_jobs(archs, kernel) if cuda else []  # the slow nvcc compiles first
    work += _triton_jobs(archs, kernel)
    results: list = [None] * len(work)
    pending = []
    for i, (key, fn, args) in enumerate(work):
        if fn is None:  # a row decided without compiling (e.g. nvcc missing)
            results[i] = args
            continue
        cached = _cache_get(key) if use_cache else None
        if cached is not None:
            results[i] = cached
        else:
            pending.append(i)
    if pending:
        n = max(1, min(jobs or min(2, os.cpu_count() or 1), len(pending)))
        ctx = multiprocessing.get_context("spawn")
        saved = os.environ.pop("TRITON_INTERPRET", None)  # spawned workers inherit the environment
        try:
            with cf.ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(work[i][1], *work[i][2]): i for i in pending}
                for fut in cf.as_completed(futures):
                    i = futures[fut]
                    try:
                        res = fut.result()
                    except Exception as exc:  # a crashed worker
                        _, _, args = work[i]
                        res = dict(kernel=str(args[1] if len(args) > 1 else args[0]), config=str(args), arch="?",
                                   registers=None, spill_bytes=None, shared_bytes=None, tensor_cores=None,
                                   source="?", needs_tensor_cores=False, error=f"{type(exc).__name__}: {exc}")
                    results[i] = res
                    if not any(r.get("error") for r in _as_rows(res)):
                        _cache_put(work[i][0], res)
        finally:
            if saved is not None:
                os.environ["TRITON_INTERPRET"] = saved
    rows = []
    for res in results:
        rows.extend(_as_rows(res))
    return rows


def problems(row: dict) -> list[str]:
    """Why a row fails the report's checks (empty when it passes)."""
    out = []
    if row.get("error"):
        return [f"did not compile: {row['error'].splitlines()[0][:300]}"]
    if row.get("spill_bytes"):
        out.append(f"spills {row['spill_bytes']} bytes")
    arch = int(str(row["arch"]).replace("sm_", "")) if str(row["arch"]).startswith("sm_") else None
    limit = SHARED_LIMIT.get(arch)
    if limit is not None and (row.get("shared_bytes") or 0) > limit:
        out.append(f"shared memory {row['shared_bytes']} B > {limit} B")
    if row.get("needs_tensor_cores") and not row.get("tensor_cores"):
        out.append("no tensor-core instructions (HMMA/HGMMA) in the SASS")
    return out


def format_table(rows: list[dict]) -> str:
    head = ("kernel", "config", "arch", "regs", "spill", "shared", "TC", "status")
    lines = []
    for r in rows:
        p = problems(r)
        lines.append((r["kernel"], r["config"], r["arch"], str(r["registers"]), str(r["spill_bytes"]),
                      str(r["shared_bytes"]), "yes" if r.get("tensor_cores") else "no",
                      "ok" if not p else "FAIL: " + "; ".join(p)))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*l).rstrip() for l in lines]
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bertfast compile-report",
                                     description="Compile every kernel configuration for sm_80 / sm_90 (no GPU "
                                                 "needed): registers, spills, shared memory, tensor cores.")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    parser.add_argument("--kernel", help="only kernels whose name contains this (CUDA: the .cu file name)")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (default min(2, cores))")
    args = parser.parse_args(argv)
    try:
        archs = tuple(int(a) for a in args.arch.split(",") if a.strip())
    except ValueError:
        parser.error(f"--arch must be comma-separated integers like 80,90, got {args.arch!r}")
    rows = collect(archs, kernel=args.kernel, use_cache=not args.no_cache, jobs=args.jobs)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        print(format_table(rows))
    bad = [r for r in rows if problems(r)]
    if not args.json:
        n_cuda = sum(r["source"] == "cuda" for r in rows)
        print(f"\n{len(rows)} configurations ({n_cuda} from csrc/cuda), {len(bad)} failing")
    if not rows:
        print("no kernel configurations found", file=sys.stderr)
        return 1
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
