"""Bandwidth of the fused bias + residual + LayerNorm and bias + GELU kernels (CUDA only).

GB/s counts the bytes each op must move at least once (inputs read, outputs written; [H] vectors and fp32
statistics included), and is also given as a fraction of the copy bandwidth measured at the start (a large
device-to-device copy, read + write bytes counted). Forward and forward + backward, against torch eager,
torch.compile and Liger-Kernel's LayerNorm when importable. Times are triton.testing.do_bench medians with the
20 / 80 % quantiles of the callable replayed from a CUDA graph (benchmarks.common.cuda_kernel_time: the kernels'
time, with no host gap between a forward's and a backward's launches; each row also has host_ms, the host's time
a call issued back to back, and timing, "cuda graph" or why not).

    python -m benchmarks.bench_norm_act [--quick]
    python -m benchmarks.bench_norm_act --sweep [--dtype bfloat16]   the LayerNorm forward's launch variants

--sweep times every (rows per program, num_warps) launch of the add + LayerNorm forward that
kernels.layer_norm.sweep_variants lists, at each shape, as the encoder calls it (x_bias and residual): the data a
GPU session needs to change the launch rule (issue 4's >= 85% of copy bandwidth; the H200 measured 69% at hidden
768 and 88% at 3072 with the rule, 2026-11-26). About 60 small compiles.
"""
from __future__ import annotations

import argparse
import sys

SHAPES = [(16384, 768), (16384, 1024), (16384, 3072)]
EPS = 1e-12


def _timed(fn, quick) -> dict:
    """benchmarks.common.cuda_kernel_time of fn: {'ms', 'p20', 'p80', 'host_ms', 'timing'}."""
    from benchmarks.common import cuda_kernel_time
    return cuda_kernel_time(fn, warmup_ms=10 if quick else 25, rep_ms=30 if quick else 100)


def _copy_ms(copy, quick) -> float:
    """A copy's time as called (one launch: nothing for a graph to remove; the ceilings of every benchmark and of
    earlier runs are measured this way)."""
    import triton.testing
    return triton.testing.do_bench(copy, warmup=10 if quick else 25, rep=30 if quick else 100, return_mode="median")


def copy_bandwidth(device="cuda", quick=False) -> float:
    """GB/s of a 1 GiB device-to-device copy (read + write bytes)."""
    import torch
    n = (256 if quick else 1024) * 2 ** 20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _copy_ms(lambda: dst.copy_(src), quick)
    return 2 * n / (ms * 1e-3) / 1e9


def same_bytes_copy(nbytes: int, device="cuda", quick=False) -> tuple[float, float]:
    """(ms, GB/s) of a device-to-device copy moving nbytes in all (nbytes / 2 read, nbytes / 2 written): the
    ceiling at an op's own size. The copy measured at the start moves 256 MiB to 1 GiB, and a 25-75 MB op cannot
    reach its rate (a launch's fixed cost and the ramp weigh at 20 us), so each shape also gets this row."""
    import torch
    half = max(1, nbytes // 2)
    src = torch.empty(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _copy_ms(lambda: dst.copy_(src), quick)
    return ms, 2 * half / (ms * 1e-3) / 1e9


def _ln_impls(n, h, dtype, device):
    """{impl: (fwd, fwd+bwd)} for y = LayerNorm(x + x_bias + residual)."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import compiled_baseline
    from bertfast.kernels import layer_norm as ln

    x = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    res = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    w = torch.ones(h, device=device, dtype=dtype, requires_grad=True)
    b = torch.zeros(h, device=device, dtype=dtype, requires_grad=True)
    xb = torch.zeros(h, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, h, device=device, dtype=dtype)

    def eager(x, res, w, b, xb):
        return F.layer_norm(x + xb + res, (h,), w, b, EPS)

    impls = {}

    def ours(rows=None):
        def fwd():
            return ln.add_layer_norm_forward(x.detach(), w.detach(), b.detach(), EPS, residual=res.detach(),
                                             x_bias=xb.detach(), rows=rows)

        def fwd_bwd():
            # as the encoder calls it: with no activation or dropout, dresidual is dx (one tensor, NOTES change 8)
            y, mean, rstd = fwd()
            return ln.add_layer_norm_backward(dy, x.detach(), w.detach(), b.detach(), mean, rstd,
                                              residual=res.detach(), x_bias=xb.detach(), residual_grad_is_dx=True)
        return fwd, fwd_bwd

    impls["bertfast"] = ours()
    # the launch policy's multi-row candidate for narrow rows (NOTES change 10), timed beside the default
    for rows in ln.forward_row_choices(ln.row_block(h)[0])[1:]:
        impls[f"bertfast rows={rows}"] = ours(rows)

    def autograd_pair(fn):
        def fwd():
            with torch.no_grad():
                return fn(x, res, w, b, xb)

        def fwd_bwd():
            y = fn(x, res, w, b, xb)
            return torch.autograd.grad(y, (x, res, w, b, xb), dy)
        return fwd, fwd_bwd

    impls["torch"] = autograd_pair(eager)
    # a cold, static compile for this shape (a compile error surfaces at the first call: an error row)
    impls["torch.compile"] = autograd_pair(compiled_baseline(eager))
    try:
        from liger_kernel.transformers import LigerLayerNorm
        try:
            liger = LigerLayerNorm(h, eps=EPS, bias=True)
        except TypeError:  # older liger: bias always present
            liger = LigerLayerNorm(h, eps=EPS)
        liger = liger.to(device=device, dtype=dtype)
        with torch.no_grad():
            liger.weight.copy_(w)
            liger.bias.copy_(b)

        def liger_fn(x, res, xb):
            return liger(x + xb + res)

        def liger_fwd():
            with torch.no_grad():
                return liger_fn(x, res, xb)

        def liger_fwd_bwd():
            # the module owns its weight and bias: the gradient is taken with respect to them (w and b are not
            # in its graph: autograd.grad refused them, and every liger fwd+bwd row was an error)
            return torch.autograd.grad(liger_fn(x, res, xb), (x, res, liger.weight, liger.bias, xb), dy)
        impls["liger (LN only; add in torch)"] = (liger_fwd, liger_fwd_bwd)
    except Exception:  # liger_kernel not installed
        pass
    return impls


def _act_impls(n, i, dtype, device):
    import torch
    import torch.nn.functional as F

    from benchmarks.common import compiled_baseline
    from bertfast.kernels import gelu

    x = torch.randn(n, i, device=device, dtype=dtype, requires_grad=True)
    bias = torch.zeros(i, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(n, i, device=device, dtype=dtype)

    def ours_fwd():
        return gelu.bias_act_forward(x.detach(), bias.detach(), "gelu")

    def ours_fwd_bwd():
        gelu.bias_act_forward(x.detach(), bias.detach(), "gelu")
        return gelu.bias_act_backward(dy, x.detach(), bias.detach(), "gelu")

    def eager(x, bias):
        return F.gelu(x + bias)

    def pair(fn):
        def fwd():
            with torch.no_grad():
                return fn(x, bias)

        def fwd_bwd():
            return torch.autograd.grad(fn(x, bias), (x, bias), dy)
        return fwd, fwd_bwd

    return {"bertfast": (ours_fwd, ours_fwd_bwd), "torch": pair(eager),
            "torch.compile": pair(compiled_baseline(eager))}


def _bytes(op, n, h, elem, mode):
    if op == "add_layer_norm":
        # fwd: read x, residual (+ 3 [H] vectors), write y, mean, rstd
        fwd = (3 * n * h + 3 * h) * elem + 8 * n
        # bwd: read dy, x, residual, w, xb, mean, rstd; write dx (= dresidual: autograd hands the one tensor to
        # both inputs, in torch as in bertfast), dw, db, dxb. (Before 2026-11-25 this counted a separate
        # dresidual, 5 [N, H] tensors instead of 4: fwd+bwd GB/s of earlier results are not comparable.)
        bwd = (4 * n * h + 5 * h) * elem + 8 * n
    else:
        fwd = (2 * n * h + h) * elem
        bwd = (3 * n * h + 2 * h) * elem  # read dy, x (+bias), write dx (+dbias)
    return fwd if mode == "fwd" else fwd + bwd


def sweep_cases(n, h, dtype, device):
    """{(rows, num_warps): forward} over the launch variants for hidden h, with the policy's launch marked by
    the first entry (kernels.layer_norm's default). The inputs are shared by every variant."""
    import torch

    from bertfast.kernels import layer_norm as ln
    x, res = (torch.randn(n, h, device=device, dtype=dtype) for _ in range(2))
    w, b = torch.rand(h, device=device, dtype=dtype) + 0.5, torch.randn(h, device=device, dtype=dtype)
    xb = torch.randn(h, device=device, dtype=dtype)
    block = ln.row_block(h)[0]
    rows0 = ln.forward_row_choices(block)[0]
    policy = (rows0, ln.forward_warps(block, rows0))
    variants = [policy] + [v for v in ln.sweep_variants(block) if v != policy]

    def case(rows, warps):
        return lambda: ln.add_layer_norm_forward(x, w, b, EPS, residual=res, x_bias=xb, rows=rows, num_warps=warps)
    return {v: case(*v) for v in variants}


def sweep(device="cuda", dtype_name="bfloat16", quick=True, on_row=None, shapes=None) -> list[dict]:
    """Rows of the forward's launch variants: ms, GB/s, fraction of the copy bandwidth, and the speed-up over the
    launch policy's variant at the same shape (above 1: faster than the rule)."""
    import torch

    from benchmarks.common import speedup
    dtype = getattr(torch, dtype_name)
    on_cuda = str(device).startswith("cuda")
    copy_bw = copy_bandwidth(device, quick) if on_cuda else None
    rows = []
    for n, h in shapes or SHAPES:
        nbytes = _bytes("add_layer_norm", n, h, torch.finfo(dtype).bits // 8, "fwd")
        same = same_bytes_copy(nbytes, device, quick)[1] if on_cuda else None
        base = None   # the rule's time: the first variant (None when it failed: no ratios then)
        for i, ((r, warps), fn) in enumerate(sweep_cases(n, h, dtype, device).items()):
            row = dict(name="add_layer_norm fwd sweep", shape=f"{n}x{h}", dtype=dtype_name, rows=r, num_warps=warps)
            try:
                t = _timed(fn, quick) if on_cuda else {"ms": _wall_ms(fn)}
            except Exception as exc:  # noqa: BLE001 - an error row (a variant that fails to compile, say)
                row.update(ms=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
            else:
                base = t if i == 0 else base
                ms, vs_policy = t["ms"], speedup(base, t)      # None: the rule failed, or was timed differently
                gbps = nbytes / (ms * 1e-3) / 1e9
                row.update(ms=round(ms, 4), gbps=round(gbps, 1),
                           vs_policy=None if vs_policy is None else round(vs_policy, 3),
                           **({"timing": t["timing"]} if "timing" in t else {}),
                           frac_copy_bw=round(gbps / copy_bw, 3) if copy_bw else None,
                           frac_same_bytes_copy=round(gbps / same, 3) if same else None)
            rows.append(row)
            if on_row:
                on_row(row)
    return rows


def _wall_ms(fn, repeats=3):
    """Wall-clock ms (CPU runs of the sweep: the interpreter; a smoke run, no bandwidth meaning)."""
    import time
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def run(device="cuda", quick=False, on_row=None) -> list[dict]:
    """The rows; on_row(row) is called as each is measured (the suite saves after each, so a run cut at its time
    limit keeps them). A failing implementation gives a row with its error."""
    import torch
    if not torch.cuda.is_available() or str(device).startswith("cpu"):
        raise RuntimeError("bench_norm_act needs a CUDA device")
    copy_bw = copy_bandwidth(device, quick)
    gpu = torch.cuda.get_device_name(device)
    rows = []

    def add(row):
        rows.append(row)
        if on_row:
            on_row(row)
    add(dict(name="copy", shape="", dtype="uint8", impl="torch copy_", ms=None, gbps=round(copy_bw, 1),
             frac_copy_bw=1.0, device=gpu))
    shapes = SHAPES[:1] + SHAPES[2:] if quick else SHAPES
    dtypes = [torch.float16, torch.bfloat16] if not quick else [torch.bfloat16]
    for dtype in dtypes:
        elem = torch.finfo(dtype).bits // 8
        dname = str(dtype).replace("torch.", "")
        for n, h in shapes:
            for op, make in (("add_layer_norm", _ln_impls), ("bias_gelu", _act_impls)):
                fwd_bytes = _bytes(op, n, h, elem, "fwd")
                same = None
                try:
                    ms, same = same_bytes_copy(fwd_bytes, device, quick)
                    add(dict(name=f"copy ({op} fwd's bytes)", shape=f"{n}x{h}", dtype=dname,
                             impl="torch copy_", ms=round(ms, 4), gbps=round(same, 1),
                             frac_copy_bw=round(same / copy_bw, 3), device=gpu))
                except Exception as exc:  # noqa: BLE001 - the op rows still run, without this ceiling
                    print(f"copy of {fwd_bytes} bytes: {exc}", file=sys.stderr)
                impls = make(n, h, dtype, device)
                for impl, (fwd, fwd_bwd) in impls.items():
                    for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                        row = dict(name=f"{op} {mode}", shape=f"{n}x{h}", dtype=dname, impl=impl, device=gpu)
                        try:
                            t = _timed(fn, quick)
                        except Exception as exc:  # noqa: BLE001 - an error row; the other impls still run
                            print(f"{op} {impl} {mode} {n}x{h} {dtype}: {exc}", file=sys.stderr)
                            add(dict(row, ms=None, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
                            continue
                        ms = t["ms"]
                        gbps = _bytes(op, n, h, elem, mode) / (ms * 1e-3) / 1e9
                        extra = {"frac_same_bytes_copy": round(gbps / same, 3)} if mode == "fwd" and same else {}
                        add(dict(row, ms=round(ms, 4), ms_q20=round(t["p20"], 4), ms_q80=round(t["p80"], 4),
                                 gbps=round(gbps, 1), frac_copy_bw=round(gbps / copy_bw, 3),
                                 host_ms=round(t["host_ms"], 4), timing=t["timing"], **extra))
    return rows


def _sweep_line(r) -> str:
    head = f"{r['shape']} {r['dtype']} rows={r['rows']:<2} warps={r['num_warps']:<2}"
    if not r["ms"]:
        return f"{head} {r['error']}"
    ratio = f", {r['vs_policy']:.2f}x the rule" if r["vs_policy"] else ""
    frac = f" {r['frac_copy_bw']:.0%} of copy" if r["frac_copy_bw"] is not None else ""
    if r.get("frac_same_bytes_copy"):
        frac += f" ({r['frac_same_bytes_copy']:.0%} of a copy of its bytes)"
    return f"{head} {r['ms']:.4f} ms {r['gbps']:7.1f} GB/s{frac}{ratio}"


def _print_sweep(dtype_name) -> int:
    """The sweep on CUDA, a line per variant as it is timed; the best variant per shape at the end, also when the
    run is interrupted (the GPU suite gives it what is left of its budget, then SIGINT)."""
    rows = []

    def on_row(r):
        rows.append(r)
        print("  " + _sweep_line(r), flush=True)
    try:
        sweep("cuda", dtype_name, quick=True, on_row=on_row)
    except KeyboardInterrupt:
        print(f"interrupted after {len(rows)} variants", flush=True)
    best = {}
    for r in rows:
        if r["ms"] and (r["shape"] not in best or r["ms"] < best[r["shape"]]["ms"]):
            best[r["shape"]] = r
    for shape, r in best.items():
        print(f"best at {shape}: {_sweep_line(r)}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time the LayerNorm forward's launch variants")
    parser.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"],
                        help="--sweep's dtype (default bfloat16)")
    args = parser.parse_args(argv)
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        print("bench_norm_act: no CUDA device here; this benchmark measures GPU bandwidth only (nothing run).")
        return 1
    if args.sweep:
        return _print_sweep(args.dtype)
    rows = run("cuda", quick=args.quick)
    cols = ["name", "shape", "dtype", "impl", "ms", "ms_q20", "ms_q80", "gbps", "frac_copy_bw", "host_ms", "timing"]
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(f"device: {rows[0]['device']}")
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
