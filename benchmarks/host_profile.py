"""Where the host time of an eager forward goes.

On the H100 (2026-11-24) an eager bert-base 1x128 forward took 8.8 ms against 0.53 ms for the same forward
replayed as a CUDA graph: eager bertfast is host-bound, and skipping the custom-op dispatcher (NOTES change 1)
did not explain it. This script measures, on one device, in one process:

  1. per forward (host time = issuing N forwards back to back, before the final synchronize; wall = after it):
     bertfast with and without an attention mask, and transformers SDPA, on the same weights;
  2. per call, at the 1x128 shapes (where every kernel is shorter than its launch): each bertfast op through
     its public function (checks + backend choice + implementation), through the implementation function the
     custom op wraps, and through the kernel launcher alone; next to the torch ops it replaces and a bare
     torch.empty, so each layer's host cost is a difference of two rows;
  3. cProfile of N forwards: the functions with the most own time, and the most cumulative time;
  4. torch.profiler (CPU): self CPU time per operator;
  5. a fine-tuning step (forward + backward in train mode, dropout on; no optimizer) at the benchmark's 32x128
     (2x16 with --tiny), bertfast and transformers SDPA: host, wall and, on CUDA, the GPU's busy time per step
     (the kernels' summed durations from torch.profiler's CUDA activity) say whether the step is host-bound
     (the H200's step was 0.72x SDPA in fp16, 2026-11-26, and the reason was unknown). Busy well below wall:
     the GPU waits on the host. Host against wall alone cannot say it: bertfast's forward reads the ids' range
     back once (the range check), so the host waits for the previous step's kernels and host ~ wall either way.

Writes host_profile.txt and host_profile.json into --out and prints the tables.

    python -m benchmarks.host_profile --device cuda --out OUT        (the GPU suite runs this)
    python -m benchmarks.host_profile --device cpu --tiny --out OUT  (a smoke run: tiny model, few repeats)
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import bench_model
from bertfast import ops
from bertfast.kernels import launch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def host_ms(fn, device, calls: int, repeats: int = 5) -> dict:
    """Median over `repeats` of (host ms per call, wall ms per call) for `calls` back-to-back calls of fn, and the
    fastest repeat's host ms (host_min_ms). Where the device keeps up, host ms is what issuing one call costs the
    CPU."""
    fn()
    _sync(device)
    host, wall = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        _sync(device)
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e3)
        wall.append((t2 - t0) / calls * 1e3)
    return {"host_ms": statistics.median(host), "wall_ms": statistics.median(wall), "host_min_ms": min(host)}


def _models(tiny: bool, dtype, device):
    dims = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128) if tiny else
            bench_model.MODELS["bert-base"])
    cfg, sdpa, _, ours = bench_model.build_models(dims, dtype, device, eager=False)
    return cfg, sdpa, ours


def _op_cases(cfg, dtype, device, tokens: int):
    """name -> {variant: callable}. Variants: public (bertfast.ops), impl (the custom op's implementation
    function, what eager no-grad calls run after the checks), launcher (the kernel launcher alone), torch."""
    h, i, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    d = h // heads
    kw = dict(dtype=dtype, device=device)
    x, r, w, b = (torch.randn(tokens, h, **kw), torch.randn(tokens, h, **kw), torch.ones(h, **kw),
                  torch.zeros(h, **kw))
    u, ub = torch.randn(tokens, i, **kw), torch.randn(i, **kw)
    qkv = torch.randn(tokens, 3, heads, d, **kw)
    cu = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    scale = d ** -0.5
    cases = {}

    # every name a lambda reads is bound when the lambda is made (default arguments): the late-bound `impl` /
    # `mod` of one op would otherwise be the next op's by the time the rows run
    impl = ops.choose("add_layer_norm", device, dtype=dtype, hidden=h)
    ln = {"public": lambda: ops.add_layer_norm(x, w, b, 1e-12, residual=r, x_bias=b),
          f"impl ({impl})": lambda impl=impl: ops._add_layer_norm_op._init_fn(x, w, b, 1e-12, r, b, "", 0.0, 0,
                                                                              impl)}
    if impl == "triton":
        ln["launcher"] = lambda mod=ops.triton_module("add_layer_norm"): mod.add_layer_norm_forward(
            x, w, b, 1e-12, r, b)
    elif impl == "cpp":
        ln["launcher"] = lambda: torch.ops.bertfast_C.add_layer_norm(x, w, b, 1e-12, r, b, "", 0.0, 0)
    ln["torch"] = lambda: F.layer_norm(x + b + r, (h,), w, b, 1e-12)
    cases["add_layer_norm"] = ln

    impl = ops.choose("bias_act", device, dtype=dtype)
    act = {"public": lambda: ops.bias_act(u, ub, "gelu"),
           f"impl ({impl})": lambda impl=impl: ops._bias_act_op._init_fn(u, ub, "gelu", impl)}
    if impl == "triton":
        act["launcher"] = lambda mod=ops.triton_module("bias_act"): mod.bias_act_forward(u, ub, "gelu")
    elif impl == "cpp":
        act["launcher"] = lambda: torch.ops.bertfast_C.bias_act(u, ub, "gelu")
    act["torch"] = lambda: F.gelu(u + ub)
    cases["bias_act"] = act

    impl = ops.choose("varlen_attention", device, dtype=dtype, head_dim=d)
    att = {"public": lambda: ops.varlen_attention(qkv, cu, tokens, validate=False),   # as the encoder calls it
           f"impl ({impl})": lambda impl=impl: ops._varlen_attention_op._init_fn(qkv, cu, tokens, scale, 0.0, 0,
                                                                                 impl)}
    if impl == "triton":
        att["launcher"] = lambda mod=ops.triton_module("varlen_attention"): mod.attention_forward(
            qkv, cu, tokens, scale, validate=False)
    q4 = qkv.permute(1, 2, 0, 3)[:, None]
    att["torch"] = lambda: F.scaled_dot_product_attention(q4[0], q4[1], q4[2])
    cases["varlen_attention"] = att

    wq = torch.randn(3 * h, h, **kw)
    cases["reference points"] = {"torch.empty": lambda: torch.empty(tokens, h, **kw),
                                 "F.linear (QKV GEMM)": lambda: F.linear(x, wq)}
    return cases


def _cprofile(fn, calls: int, device) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn()
    _sync(device)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    out.write(f"cProfile of {calls} forwards, by own time\n")
    stats.sort_stats("tottime").print_stats(35)
    out.write(f"cProfile of {calls} forwards, by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(35)
    return out.getvalue()


def gpu_busy_ms(fn, device, calls: int) -> float | None:
    """The GPU's busy time per call of fn: the summed durations of the kernels, copies and sets that torch.profiler
    records with CUDA activity only over `calls` calls (one stream: they do not overlap). None on CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile
    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    total_us = 0.0
    for event in prof.key_averages():
        total_us += getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)
    return total_us / 1e3 / calls


def _torch_profile(fn, calls: int, device) -> str:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
        _sync(device)
    return (f"torch.profiler (CPU activity) of {calls} forwards, by self CPU time\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35))


def run(device="cuda", tiny=False, calls=None, out_dir=None) -> dict:
    device = torch.device(device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    calls = calls or (50 if device.type == "cuda" else 5)
    seq = 16 if tiny else 128
    cfg, sdpa, ours = _models(tiny, dtype, device)
    ids = torch.randint(1, cfg.vocab_size, (1, seq), device=device)
    mask = torch.ones_like(ids)
    lines, result = [], {"device": str(device), "dtype": str(dtype), "model": "tiny" if tiny else "bert-base",
                         "batch": 1, "seqlen": seq, "calls": calls, "forward": {}, "ops": {}}
    header = (f"host profile: {result['model']} {str(dtype)[6:]} 1x{seq} on "
              f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
              f"backends: " + ", ".join(f"{k}={v}" for k, v in ops.implementation_table(device).items()))
    lines.append(header)

    def write(profiles=""):
        """The text and json so far (after each section: a run cut at its time limit keeps what it measured)."""
        if out_dir:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "host_profile.txt").write_text("\n".join(lines) + ("\n" + profiles if profiles else "") + "\n")
            (out / "host_profile.json").write_text(json.dumps(result, indent=1))
    with torch.inference_mode():
        forwards = {"bertfast, attention_mask given": lambda: ours(ids, attention_mask=mask),
                    "bertfast, no attention_mask": lambda: ours(ids),
                    "transformers sdpa, attention_mask given": lambda: sdpa(ids, attention_mask=mask)}
        lines.append(f"\n1. per forward, {calls} back to back (ms per forward; host = before the final sync)")
        # and the first forward with every Triton launch through JITFunction.run (kernels/launch.py's cache off)
        rows = [(name, fn, False) for name, fn in forwards.items()] + (
            [("bertfast, mask given, launch cache off", forwards["bertfast, attention_mask given"], True)]
            if launch.ENABLED else [])
        for name, fn, cache_off in rows:
            with launch.disabled() if cache_off else contextlib.nullcontext():
                t = host_ms(fn, device, calls)
            result["forward"][name] = t
            lines.append(f"  {name:<42} host {t['host_ms']:8.3f}   wall {t['wall_ms']:8.3f}")
        write()
        layers = cfg.num_hidden_layers
        lines.append(f"\n2. per call at the {seq}-token shapes ({calls * 4} calls back to back; us per call)")
        for op, variants in _op_cases(cfg, dtype, device, seq).items():
            result["ops"][op] = {}
            for variant, fn in variants.items():
                t = host_ms(fn, device, calls * 4)
                result["ops"][op][variant] = t
                lines.append(f"  {op:<17} {variant:<24} host {t['host_ms'] * 1e3:9.1f}   "
                             f"wall {t['wall_ms'] * 1e3:9.1f}")
        lines.append(f"  ({layers} layers: each layer runs add_layer_norm x2, bias_act, varlen_attention "
                     f"and 4 GEMMs)")
        print("\n".join(lines), flush=True)
        write()
        fn = forwards["bertfast, attention_mask given"]
        profiles = "\n3. " + _cprofile(fn, calls, device)
        print(profiles, flush=True)
        write(profiles)
        section4 = "\n4. " + _torch_profile(fn, max(2, calls // 5), device)
        print(section4, flush=True)
        write(profiles + section4)
    batch, train_seq = (2, 16) if tiny else (32, 128)
    steps = max(2, calls // 5)
    section5 = len(lines)
    lines.append(f"\n5. a fine-tuning step, {batch}x{train_seq}, forward + backward in train mode (no optimizer), "
                 f"{steps} back to back (ms per step)")
    tids = torch.randint(1, cfg.vocab_size, (batch, train_seq), device=device)
    tmask = torch.ones_like(tids)
    result["train_step"] = {}
    rows = [("bertfast", ours, False), ("transformers sdpa", sdpa, False)] + (
        [("bertfast, launch cache off", ours, True)] if launch.ENABLED else [])
    for name, model, cache_off in rows:
        train = copy.deepcopy(model).train()

        def step(train=train):
            train(tids, attention_mask=tmask).last_hidden_state.float().sum().backward()
        with launch.disabled() if cache_off else contextlib.nullcontext():
            t = host_ms(step, device, steps, repeats=3)
        busy = ""
        try:
            t["gpu_busy_ms"] = gpu_busy_ms(step, device, steps)
        except Exception as exc:  # noqa: BLE001 - the host / wall figures stand; the line says why busy is missing
            t["gpu_busy_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
            busy = f"   gpu busy: {t['gpu_busy_error']}"
        if t.get("gpu_busy_ms") is not None:
            busy = (f"   gpu busy {t['gpu_busy_ms']:8.3f} ({t['gpu_busy_ms'] / t['wall_ms']:.0%} of wall: "
                    f"{'GPU-bound' if t['gpu_busy_ms'] >= 0.9 * t['wall_ms'] else 'the GPU waits on the host'})")
        result["train_step"][name] = t
        lines.append(f"  {name:<42} host {t['host_ms']:8.3f}   wall {t['wall_ms']:8.3f}{busy}")
        del train
    print("\n".join(lines[section5:]), flush=True)
    write(profiles + section4)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 64-wide model and 16 tokens (smoke run)")
    p.add_argument("--calls", type=int, default=None, help="forwards per timing (default 50 on CUDA, 5 on CPU)")
    p.add_argument("--out", default=None, help="folder for host_profile.txt / host_profile.json")
    a = p.parse_args(argv)
    run(a.device, a.tiny, a.calls, a.out)


if __name__ == "__main__":
    main()
