"""CPU benchmark: each fused C++ op of bertfast._C against the torch composite it replaces.

BERT-base shapes (T = 4096 packed tokens, H = 768, I = 3072; pad/unpad from a 32 x 256 padded batch with half
of it padding), fp32, torch.set_num_threads(2). Wall-clock median over repeats after warm-up; ours and torch's
runs alternate in one loop so both see the same machine load. The LayerNorm is also timed forward + backward
(rows "... fwd+bwd"), as a training step runs it: its backward recomputes the pre-LayerNorm sum from x and the
residual instead of saving it, which costs the backward one read more than torch's composite and the forward
one write less.

Throughput: each case's bytes are what the fused op reads and writes once (every element of its inputs and
outputs; for gathers, the rows gathered), and every row of the case, torch's too, is given in GB/s of those
bytes, as a fraction of the copy bandwidth (`frac_copy_bw`: torch's copy_ of 64 MiB, 2 threads, read + written
bytes; the faster of a copy at the start of the run and one at its end), and of a copy moving the case's own
bytes (`frac_same_bytes_copy`: half read, half written; at these sizes part of it can sit in the L3, so this is
the ceiling at the op's size).

    python benchmarks/bench_cpu_ops.py [--quick] [--reuse-memory]

--reuse-memory (run(reuse_memory=True)) tells glibc malloc to keep freed blocks instead of returning blocks over
32 MiB to the OS (mallopt M_MMAP_THRESHOLD / M_TRIM_THRESHOLD = 1 GiB, for the rest of the process): without it
every [4096, 3072] fp32 output (48 MiB) is fresh mmap'd memory and its page faults (~45 ms here) dominate both
sides' timings. jemalloc / tcmalloc behave like the reuse mode.

run(quick=False) -> list of rows {name, shape, dtype, impl, ms, speedup, ms_min, speedup_min, bytes, gbps,
frac_copy_bw, frac_same_bytes_copy} (ms = median; speedup = torch ms / our ms on our rows, 1.0 on torch's; the
_min pair from the fastest repeat, steadier on a shared machine), after a first row "copy" with the copy
bandwidth (ms None). suite_run(quick) -> the rows of both allocator modes, the second measured in a child process
(mallopt lasts for the rest of a process), each row's `malloc` saying which (`bertfast bench` uses it).
"""
import argparse
import json
import pathlib
import statistics
import time

import torch
import torch.nn.functional as F

import bertfast._C  # noqa: F401  (registers torch.ops.bertfast_C)

ops = torch.ops.bertfast_C
T, H, I = 4096, 768, 3072
B, S = 32, 256
COPY_BYTES = 2 * 64 * 2 ** 20      # the copy ceiling's bytes: 64 MiB read, 64 MiB written
VOCAB, POS, TYPES = 30522, 512, 2


def _time_pair(ours, theirs, repeats, warmup=3):
    for _ in range(warmup):
        ours()
        theirs()
    a, b = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ours()
        t1 = time.perf_counter()
        theirs()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return (statistics.median(a) * 1e3, statistics.median(b) * 1e3), (min(a) * 1e3, min(b) * 1e3)


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


DROPOUT_P, SEED = 0.1, 1234     # the LayerNorm cases' dropout


def _sig(v: float) -> float:
    """v to 4 significant digits (never rounded to 0, as a fixed number of decimals would a slow tiny case)."""
    return float(f"{v:.4g}")


def ln_inputs(T: int, H: int, g: torch.Generator):
    """x, residual, dy [T, H] and weight, bias, x_bias [H] of the LayerNorm cases, the first draws from g."""
    x, r, dy = (torch.randn(T, H, generator=g) for _ in range(3))
    w, b, xb = 1 + 0.1 * torch.randn(H, generator=g), 0.1 * torch.randn(H, generator=g), torch.randn(H, generator=g)
    return x, r, dy, w, b, xb


def _cases(T=T, H=H, I=I, B=B, S=S):
    """[(name, shape, ours, torch's, bytes)]: BERT-base sizes by default (smaller ones for the tests). The
    LayerNorm inputs are ln_inputs(T, H, torch.Generator().manual_seed(0))."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g)

    x, r, dy, w, b, xb = ln_inputs(T, H, g)
    y, mean, rstd, _ = ops.add_layer_norm(x, w, b, 1e-12, r, xb, "")
    yg, mean_g, rstd_g, _ = ops.add_layer_norm(x, w, b, 1e-12, r, xb, "gelu")
    # with dropout the backward reads the forward's keep bits (as bertfast.ops passes them)
    _, mean_d, rstd_d, keep_d = ops.add_layer_norm(x, w, b, 1e-12, r, xb, "", DROPOUT_P, SEED)
    u, ub, du = randn(T, I), randn(I), randn(T, I)

    def ln_leaves():
        return [t.clone().requires_grad_() for t in (x, w, b, r, xb)]

    def ln_composite(leaves, act, dropout_p):
        """torch's composite of add_layer_norm on leaves (x, weight, bias, residual, x_bias)."""
        z = leaves[0] + leaves[4]
        z = F.gelu(z) if act == "gelu" else z
        z = F.dropout(z, dropout_p, training=True) if dropout_p else z
        return F.layer_norm(z + leaves[3], (H,), leaves[1], leaves[2], 1e-12)

    def ln_composite_bwd(act, dropout_p=0.0):
        leaves = ln_leaves()
        out = ln_composite(leaves, act, dropout_p)      # the graph built once; only the backward is timed
        return lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True)

    def ln_ours_train(act, dropout_p=0.0):
        def step():
            _, m, s, keep = ops.add_layer_norm(x, w, b, 1e-12, r, xb, act, dropout_p, SEED)
            return ops.add_layer_norm_backward(dy, x, w, m, s, r, xb, act, dropout_p, SEED, keep)
        return step

    def ln_composite_train(act, dropout_p=0.0):
        leaves = ln_leaves()
        return lambda: torch.autograd.grad(ln_composite(leaves, act, dropout_p), leaves, dy)

    def act_composite_bwd(approximate):
        lx, lb = u.clone().requires_grad_(), ub.clone().requires_grad_()
        out = F.gelu(lx + lb, approximate=approximate)
        return lambda: torch.autograd.grad(out, (lx, lb), du, retain_graph=True)

    n = B * S
    mask = torch.zeros(B, S, dtype=torch.bool)
    lengths = torch.randint(1, S + 1, (B,), generator=g)
    lengths = (lengths.float() * (T / lengths.sum().item())).round().clamp(1, S).long()
    for i, length in enumerate(lengths.tolist()):
        mask[i, :length] = True
    idx = mask.view(-1).nonzero().view(-1)
    t_real = idx.numel()
    ids = torch.randint(0, VOCAB, (n,), generator=g)
    pos = torch.arange(S).repeat(B)
    tt = torch.randint(0, TYPES, (n,), generator=g)
    we, pe, te = randn(VOCAB, H), randn(POS, H), randn(TYPES, H)
    xp = randn(n, H)
    xu = randn(t_real, H)

    def embed_torch():
        h = F.embedding(ids[idx], we) + F.embedding(tt[idx], te) + F.embedding(pos[idx], pe)
        return F.layer_norm(h, (H,), w, b, 1e-12)

    e_out, e_mean, e_rstd = ops.embed(ids, idx, pos, tt, we, pe, te, w, b, 1e-12)
    de = randn(*e_out.shape)

    def embed_composite_bwd():
        leaves = [t.clone().requires_grad_() for t in (we, pe, te, w, b)]
        h = F.embedding(ids[idx], leaves[0]) + F.embedding(tt[idx], leaves[2]) + F.embedding(pos[idx], leaves[1])
        out = F.layer_norm(h, (H,), leaves[3], leaves[4], 1e-12)
        return lambda: torch.autograd.grad(out, leaves, de, retain_graph=True)

    # bytes read and written once: the [N, H] tensors, the row statistics, the [H] vectors, the keep bits
    vec = _nbytes(w)
    ln_fwd = _nbytes(x, r, y, mean, rstd) + 3 * vec                     # x, residual, w, b, x_bias -> y, stats
    ln_fwd_drop = ln_fwd + _nbytes(keep_d)
    ln_bwd = _nbytes(dy, x, r, mean, rstd, x) + 5 * vec                 # dy, x, residual, stats, w, x_bias -> dx,
    ln_bwd_two = ln_bwd + _nbytes(x)                                    # dw, db, dx_bias; and dresidual apart
    ids_read = 3 * t_real * ids.element_size() + _nbytes(idx)           # the real tokens' ids, positions, types
    # the distinct word, position and type rows they gather (a row repeated in the batch is read from memory once
    # and then from cache: 3 rows a token counted the 2-row type table T times, ~2x the bytes, 2026-11-27 review)
    rows_gathered = sum(int(torch.unique(v[idx]).numel()) for v in (ids, pos, tt)) * H * we.element_size()
    embed_bytes = ids_read + rows_gathered + 2 * vec + _nbytes(e_out, e_mean, e_rstd)
    # the backward: de, the stats and weight read, the rows gathered again, dweight / dbias and every row of the
    # three table gradients written (zeros where no token is)
    embed_bwd_bytes = ids_read + rows_gathered + _nbytes(de, e_mean, e_rstd) + 3 * vec + _nbytes(we, pe, te)
    return [
        ("add_layer_norm", f"{T}x{H}",
         lambda: ops.add_layer_norm(x, w, b, 1e-12, r, xb, ""),
         lambda: F.layer_norm(x + xb + r, (H,), w, b, 1e-12), ln_fwd),
        ("add_layer_norm(gelu)", f"{T}x{H}",
         lambda: ops.add_layer_norm(x, w, b, 1e-12, r, xb, "gelu"),
         lambda: F.layer_norm(F.gelu(x + xb) + r, (H,), w, b, 1e-12), ln_fwd),
        ("add_layer_norm_backward", f"{T}x{H}",
         lambda: ops.add_layer_norm_backward(dy, x, w, mean, rstd, r, xb, ""), ln_composite_bwd(""), ln_bwd),
        ("add_layer_norm_backward(gelu)", f"{T}x{H}",
         lambda: ops.add_layer_norm_backward(dy, x, w, mean_g, rstd_g, r, xb, "gelu"), ln_composite_bwd("gelu"),
         ln_bwd_two),
        ("add_layer_norm(dropout 0.1)", f"{T}x{H}",
         lambda: ops.add_layer_norm(x, w, b, 1e-12, r, xb, "", DROPOUT_P, SEED),
         lambda: F.layer_norm(F.dropout(x + xb, DROPOUT_P, training=True) + r, (H,), w, b, 1e-12), ln_fwd_drop),
        ("add_layer_norm_backward(dropout 0.1)", f"{T}x{H}",
         lambda: ops.add_layer_norm_backward(dy, x, w, mean_d, rstd_d, r, xb, "", DROPOUT_P, SEED, keep_d),
         ln_composite_bwd("", DROPOUT_P), ln_bwd_two + _nbytes(keep_d)),
        ("add_layer_norm fwd+bwd", f"{T}x{H}", ln_ours_train(""), ln_composite_train(""), ln_fwd + ln_bwd),
        ("add_layer_norm(gelu) fwd+bwd", f"{T}x{H}", ln_ours_train("gelu"), ln_composite_train("gelu"),
         ln_fwd + ln_bwd_two),
        ("add_layer_norm(dropout 0.1) fwd+bwd", f"{T}x{H}", ln_ours_train("", DROPOUT_P),
         ln_composite_train("", DROPOUT_P),
         ln_fwd_drop + ln_bwd_two + _nbytes(keep_d)),
        ("bias_act(gelu)", f"{T}x{I}", lambda: ops.bias_act(u, ub, "gelu"), lambda: F.gelu(u + ub),
         2 * _nbytes(u) + _nbytes(ub)),
        ("bias_act(gelu_tanh)", f"{T}x{I}", lambda: ops.bias_act(u, ub, "gelu_tanh"),
         lambda: F.gelu(u + ub, approximate="tanh"), 2 * _nbytes(u) + _nbytes(ub)),
        ("bias_act_backward(gelu)", f"{T}x{I}", lambda: ops.bias_act_backward(du, u, ub, "gelu"),
         act_composite_bwd("none"), 3 * _nbytes(u) + 2 * _nbytes(ub)),
        ("embed", f"{t_real}x{H} of {B}x{S}",
         lambda: ops.embed(ids, idx, pos, tt, we, pe, te, w, b, 1e-12), embed_torch, embed_bytes),
        ("embed_backward", f"{t_real}x{H} of {B}x{S}, dense [{VOCAB}, {H}] table",
         lambda: ops.embed_backward(de, ids, idx, pos, tt, we, pe, te, w, e_mean, e_rstd), embed_composite_bwd(),
         embed_bwd_bytes),
        ("unpad", f"{n}x{H} -> {t_real}", lambda: ops.unpad(xp, idx), lambda: xp.index_select(0, idx),
         2 * _nbytes(xu) + _nbytes(idx)),
        ("pad", f"{t_real}x{H} -> {n}", lambda: ops.pad(xu, idx, n),
         lambda: xu.new_zeros(n, H).index_put_((idx,), xu), _nbytes(xu, xp, idx)),
    ]


def _reuse_freed_memory():
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    if not ok:
        raise RuntimeError("mallopt failed")


def _copy_gbs(nbytes: int, repeats: int) -> float:
    """GB/s (read + written bytes) of torch's copy_ moving nbytes in all: nbytes / 2 read, nbytes / 2 written."""
    src = torch.randn(max(nbytes // 8, 1))
    dst = torch.empty_like(src)
    (ms, _), _ = _time_pair(lambda: dst.copy_(src), lambda: None, repeats)
    return 2 * _nbytes(src) / (ms * 1e-3) / 1e9


def run(quick=False, reuse_memory=False, sizes=None):
    """The rows (module docstring); sizes: _cases' keyword arguments (BERT-base sizes when None)."""
    if reuse_memory:
        _reuse_freed_memory()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    repeats = 21 if quick else 41
    try:
        copy_start = _copy_gbs(COPY_BYTES, repeats)
        rows, raw_gbps = [], []     # raw_gbps: each row's unrounded GB/s, for its fraction of the copy (below)
        # no torch.no_grad(): the backward composites build their graphs once in _cases() (no other input
        # requires grad, so the forward composites record nothing either)
        for name, shape, ours, theirs, nbytes in _cases(**(sizes or {})):
            (ms_ours, ms_torch), (min_ours, min_torch) = _time_pair(ours, theirs, repeats)
            same = _copy_gbs(nbytes, repeats)

            def throughput(ms):
                gbps = nbytes / (ms * 1e-3) / 1e9
                raw_gbps.append(gbps)
                return dict(bytes=nbytes, gbps=_sig(gbps), frac_same_bytes_copy=_sig(gbps / same))
            rows.append(dict(name=name, shape=shape, dtype="float32", impl="bertfast_C", ms=round(ms_ours, 3),
                             speedup=round(ms_torch / ms_ours, 2), ms_min=round(min_ours, 3),
                             speedup_min=round(min_torch / min_ours, 2), **throughput(ms_ours)))
            rows.append(dict(name=name, shape=shape, dtype="float32", impl="torch", ms=round(ms_torch, 3),
                             speedup=1.0, ms_min=round(min_torch, 3), speedup_min=1.0, **throughput(ms_torch)))
        # the ceiling: the faster of a copy at the start and one at the end (one measurement on a shared machine
        # can be low: the suite's AMD run of 2026-11-26 had its matmul ceiling at half the idle machine's rate)
        copy_bw = max(copy_start, _copy_gbs(COPY_BYTES, repeats))
        for r, gbps in zip(rows, raw_gbps):
            r["frac_copy_bw"] = _sig(gbps / copy_bw)
        rows.insert(0, dict(name="copy", shape="64 MiB", dtype="float32", impl="torch copy_", ms=None,
                            gbps=_sig(copy_bw), frac_copy_bw=1.0))
    finally:
        torch.set_num_threads(threads)
    return rows


MALLOC_MODES = {False: "glibc defaults", True: "freed memory reused"}


def suite_run(quick=False):
    """Both allocator modes: glibc's defaults in this process, then --reuse-memory in a child process."""
    from benchmarks.common import child_rows   # here: the file also runs as a script, without the package
    rows = [dict(r, malloc=MALLOC_MODES[False]) for r in run(quick=quick)]
    reused = child_rows("benchmarks.bench_cpu_ops", ["--reuse-memory"] + (["--quick"] if quick else []))
    return rows + [dict(r, shape=f"{r['shape']}, {MALLOC_MODES[True]}", malloc=MALLOC_MODES[True]) for r in reused]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--reuse-memory", action="store_true", help="keep freed memory in the process (see above)")
    parser.add_argument("--json", metavar="PATH", help="also write the rows to PATH as JSON")
    args = parser.parse_args()
    rows = run(quick=args.quick, reuse_memory=args.reuse_memory)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(rows))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads available, benchmark uses 2; "
          f"{torch.backends.cpu.get_cpu_capability()}; "
          f"malloc: {MALLOC_MODES[args.reuse_memory]}")
    copy, cases = rows[0], rows[1:]
    print(f"copy bandwidth {copy['gbps']:.1f} GB/s (64 MiB read + 64 MiB written); "
          "median (and min) wall ms over the repeats; speedup = torch / bertfast_C; "
          "GB/s of the fused op's bytes and its fraction of a copy of the same bytes")
    print(f"{'op':38s} {'shape':24s} {'bertfast_C ms':>14s} {'torch ms':>10s} {'speedup':>8s} "
          f"{'min ours':>9s} {'min torch':>9s} {'speedup':>8s} {'GB/s':>6s} {'of copy':>8s}")
    for ours, theirs in zip(cases[::2], cases[1::2]):
        print(f"{ours['name']:38s} {ours['shape']:24s} {ours['ms']:14.3f} {theirs['ms']:10.3f} "
              f"{ours['speedup']:7.2f}x {ours['ms_min']:9.3f} {theirs['ms_min']:9.3f} {ours['speedup_min']:7.2f}x "
              f"{ours['gbps']:6.1f} {ours['frac_same_bytes_copy']:8.0%}")


if __name__ == "__main__":
    main()
