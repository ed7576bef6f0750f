"""The ops layer: bertfast:: custom ops (schemas, fake impls, autograd), backend choice, gradients in float64."""
import pytest
import torch

from bertfast import ops
from bertfast.padding import unpad_mask
from helpers import KERNEL_DEVICE

BACKENDS = ["auto", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", request.param)
    return request.param


def _packed(lengths, heads=2, head_dim=32, dtype=torch.float64):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    qkv = torch.randn(int(cu[-1]), 3, heads, head_dim, dtype=dtype)
    return qkv, cu, max(lengths)


def _attention_f64(qkv, cu, scale):
    out = torch.empty(qkv.shape[0], qkv.shape[2], qkv.shape[3], dtype=torch.float64)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        q, k, v = (qkv[s:e, i].double().transpose(0, 1) for i in range(3))
        out[s:e] = (torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v).transpose(0, 1)
    return out


def test_ops_registered():
    for name in ("varlen_attention", "varlen_attention_backward", "add_layer_norm", "add_layer_norm_backward",
                 "bias_act", "bias_act_backward", "embed", "embed_backward", "unpad", "pad"):
        assert hasattr(torch.ops.bertfast, name), name


def test_attention_matches_float64(backend):
    qkv, cu, m = _packed([1, 17, 5, 33], dtype=torch.float32)
    out = ops.varlen_attention(qkv, cu, m)
    ref = _attention_f64(qkv, cu, 32 ** -0.5)
    assert (out.double() - ref).abs().max() < 1e-5


def test_gradcheck_attention(backend):
    qkv, cu, m = _packed([1, 4, 3], heads=2, head_dim=8)
    qkv.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ops.varlen_attention(t, cu, m), (qkv,), eps=1e-6, atol=1e-6, fast_mode=True)


def _attention_naive(qkv, cu, scale, dropout_p, seed):
    """Attention per sequence in qkv's dtype, with the Triton attention kernels' keep-mask for this seed
    (kernels.attention.dropout_mask, in the interpreter: the mask the CPU attention must draw too, NOTES change
    19); autograd of this is the independent gradient."""
    from bertfast.kernels.attention import dropout_mask
    lengths = (cu[1:] - cu[:-1]).tolist()
    if dropout_p > 0:
        mask = dropout_mask(cu, max(max(lengths), 1), qkv.shape[2], dropout_p, seed, KERNEL_DEVICE).cpu()
    outs = []
    for b, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        if e == s:
            continue
        q, k, v = (qkv[s:e, i].transpose(0, 1) for i in range(3))              # [heads, L, d]
        p = torch.softmax(q @ k.transpose(-1, -2) * scale, -1)
        if dropout_p > 0:
            p = p * mask[b, :, :e - s, :e - s].to(p.dtype) / (1 - dropout_p)
        outs.append((p @ v).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.gpu     # its reference mask comes from the Triton kernels (on the GPU when there is one)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "formula"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("lengths", [[1, 0, 17, 5, 33, 33, 2], [24, 24, 24], [1]], ids=["varlen", "equal", "one"])
def test_cpu_attention_gradients(lengths, dropout_p, dtype, fused, monkeypatch):
    """The CPU attention's backward (NOTES change 16: ATen's fused CPU kernel without dropout, the gradient's
    formulas with dropout or where the fused kernel is missing) against float64 autograd of a naive attention
    with the same keep-mask; flash-attention's rule: max error within 3x PyTorch's own in the same dtype, plus one
    ulp of the gradient's scale (and of fp32 over head_dim, as in test_attention.py). Equal consecutive lengths go through the batched blocks, a 0-length sequence has
    no rows, a 1-token one a zero dq/dk. The forward's lse is checked where the fused kernel gives it."""
    if not fused:
        monkeypatch.setattr(ops, "_cpu_flash", lambda cdt, p: None)
    elif ops._cpu_flash(torch.float32, 0.0) is None:
        pytest.fail("this torch lacks ATen's fused CPU attention ops")
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    torch.manual_seed(len(lengths) * 1000 + int(dropout_p * 100) * 10 + dtypes.index(dtype) * 2 + fused)
    qkv, cu, m = _packed(lengths, heads=3, head_dim=16, dtype=dtype)
    dout = torch.randn(qkv.shape[0], 3, 16).to(dtype)
    scale = 16 ** -0.5
    torch.manual_seed(1234)
    seed = ops.new_seed()   # what varlen_attention draws after the same manual_seed
    torch.manual_seed(1234)
    x = qkv.clone().requires_grad_(True)
    out = ops.varlen_attention(x, cu, m, dropout_p=dropout_p)
    (grad,) = torch.autograd.grad(out, x, dout)
    assert grad.dtype == dtype and grad.shape == qkv.shape

    def naive(dt):
        leaf = qkv.to(dt).requires_grad_(True)
        o = _attention_naive(leaf, cu, scale, dropout_p, seed)
        return o.detach(), torch.autograd.grad(o, leaf, dout.to(dt))[0]
    ref_out, ref_grad = naive(torch.float64)
    _, lse = ops._attention_cpu(qkv, cu, scale, dropout_p, seed)
    if fused and dropout_p == 0:
        ref_lse = torch.cat([torch.logsumexp(qkv[s:e, 0].double().transpose(0, 1)
                                             @ qkv[s:e, 1].double().permute(1, 2, 0) * scale, -1)
                             for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()) if e > s], dim=1)
        assert (lse.double() - ref_lse).abs().max() <= 1e-5 * max(1.0, ref_lse.abs().max().item())
    else:
        assert lse.isnan().all()
    low_out, low_grad = naive(dtype)
    eps = torch.finfo(dtype).eps
    err = (out.double() - ref_out).abs().max().item()
    assert err <= 2 * (low_out.double() - ref_out).abs().max().item() + eps * ref_out.abs().max().item()
    for i, name in enumerate("qkv"):
        got, ref, low = grad[:, i].double(), ref_grad[:, i], low_grad[:, i].double()
        err = (got - ref).abs().max().item()
        # + the fp32 rounding of dP - rowsum(dO * O): head_dim-long dot products of O(1) values that cancel
        # (exactly, for a one-token sequence, in PyTorch's softmax backward; not in the fused kernel, which takes
        # the row sum from the forward's output as flash attention does)
        bound = (3 * (low - ref).abs().max().item() + eps * max(ref.abs().max().item(), 1.0)
                 + torch.finfo(torch.float32).eps * 16)
        assert err <= bound, f"d{name}: max error {err:.3g} > bound {bound:.3g}"


def test_cpu_attention_dropout_mask_without_the_extension(monkeypatch):
    """Without bertfast._C the CPU attention still trains with dropout (torch's generator draws the mask, the
    backward the same one), and says so: a notice, and `bertfast info`'s table names the mask's source."""
    assert "bertfast._C Philox" in ops.implementation_table("cpu")["varlen_attention"]
    monkeypatch.setattr(ops, "_notices", {})
    # only the attention's mask source is re-read per call; the other ops' availability stays cached (the
    # extension is there), which this test does not touch
    monkeypatch.setattr(ops, "cpp_extension_error", lambda: "bertfast._C could not be imported (test)")
    assert "torch's generator" in ops.implementation_table("cpu")["varlen_attention"]
    cu = torch.tensor([0, 5, 10, 15, 15, 22], dtype=torch.int32)    # a block of three, an empty one, one more
    qkv = torch.randn(22, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    out = ops.varlen_attention(qkv, cu, 7, dropout_p=0.3)
    (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    assert torch.isfinite(grad).all() and any("torch's generator" in v for v in ops.notices().values())
    def attention(t):  # the same seed each call: the backward must apply the forward's mask
        torch.manual_seed(3)
        return ops.varlen_attention(t, cu, 7, dropout_p=0.3)

    assert torch.autograd.gradcheck(attention, (qkv,))


def test_cpu_attention_checks_cu_seqlens():
    """The CPU attention reads cu_seqlens on the host, so it checks them: a batch that does not cover qkv's rows
    exactly is an error, not attention over made-up sequences."""
    qkv = torch.randn(6, 3, 2, 8)
    for cu, what in (([0, 2, 4], "end at T"), ([1, 3, 6], "start at 0"), ([0, 4, 2, 6], "monotonic")):
        with pytest.raises(ValueError, match=f"cu_seqlens must .*{what}"):
            ops.varlen_attention(qkv, torch.tensor(cu, dtype=torch.int32), 4)


@pytest.mark.parametrize("lengths", [[3, 5], [3, 0, 5], [0, 8], [0, 0], [1], [2, 0, 0, 7, 1]])
def test_padded_reference_attention(lengths):
    """The reference attention of CUDA devices (head dims the Triton kernel lacks, float64,
    BERTFAST_BACKEND=reference) runs here on CPU against the CPU attention: equal outputs and gradients, an empty
    sequence anywhere included (its -inf keys used to give NaN gradients to the next sequence), no tokens at all
    (an index error before), and no host read (the outputs used to be gathered with a boolean mask, which syncs)."""
    torch.manual_seed(len(lengths) * 7 + sum(lengths))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    total, max_seqlen = int(cu[-1]), max(max(lengths), 1)
    qkv = torch.randn(total, 3, 2, 16, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(total, 2, 16, dtype=torch.float64)
    want = ops._attention_cpu(qkv.detach(), cu, 0.25, 0.0, 0)[0]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        got = ops._attention_padded(qkv, cu, max_seqlen, 0.25, 0.0, 0)
    called = {e.name for e in prof.events()}
    assert not called & {"aten::nonzero", "aten::item", "aten::_local_scalar_dense"}, called
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    if total:
        (grad,) = torch.autograd.grad(got, qkv, dout)
        want_grad = ops._attention_backward_cpu(dout, qkv.detach(), want, torch.full((2, total), float("nan")),
                                                cu, 0.25, 0.0, 0)
        assert torch.isfinite(grad).all() and torch.allclose(grad, want_grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_attention_with_dropout(backend):
    """The keep-mask is a function of the seed (drawn from torch's generator, reset before each call here), so
    with dropout the op is still a deterministic function."""
    qkv, cu, m = _packed([1, 4, 3, 3], heads=2, head_dim=8)
    qkv.requires_grad_(True)

    def f(t):
        torch.manual_seed(7)
        return ops.varlen_attention(t, cu, m, dropout_p=0.3)
    assert torch.autograd.gradcheck(f, (qkv,), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("activation", [None, "gelu", "gelu_tanh"])
def test_gradcheck_add_layer_norm(backend, activation):
    x, r = torch.randn(3, 16, dtype=torch.float64, requires_grad=True), torch.randn(3, 16, dtype=torch.float64,
                                                                                requires_grad=True)
    w, b, xb = (torch.randn(16, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(
        lambda *a: ops.add_layer_norm(a[0], a[1], a[2], 1e-5, residual=a[3], x_bias=a[4], activation=activation),
        (x, w, b, r, xb), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("activation,with_xb,n,h", [(None, False, 1, 1023), (None, True, 3, 384),
                                                    ("gelu", True, 1, 1023)])
def test_add_layer_norm_residual_and_x_gradients(monkeypatch, impl, activation, with_xb, n, h):
    """Each input of ops.add_layer_norm gets its own gradient, in fp32, per implementation, against float64
    autograd: without an activation or dropout the C++ and Triton backwards return dx once and the formula hands
    it to the residual too (a residual left without it trains nothing); with an activation dresidual is not dx."""
    monkeypatch.setenv("BERTFAST_BACKEND", impl)
    torch.manual_seed(n * 10 + h)
    x, r, dy = (torch.randn(n, h) for _ in range(3))
    w, b, xb = 1 + 0.1 * torch.randn(h), 0.1 * torch.randn(h), 0.5 * torch.randn(h)
    tensors = [x, r, w, b] + ([xb] if with_xb else [])
    leaves = [t.clone().requires_grad_() for t in tensors]
    y = ops.add_layer_norm(leaves[0], leaves[2], leaves[3], 1e-5, residual=leaves[1],
                           x_bias=leaves[4] if with_xb else None, activation=activation)
    grads = torch.autograd.grad(y, leaves, dy)
    l64 = [t.double().requires_grad_() for t in tensors]
    z = l64[0] + l64[4] if with_xb else l64[0]
    z = torch.nn.functional.gelu(z) if activation else z
    ref = torch.nn.functional.layer_norm(z + l64[1], (h,), l64[2], l64[3], 1e-5)
    want = torch.autograd.grad(ref, l64, dy.double())
    assert (y.double() - ref).abs().max() < 1e-4
    for name, g, w64 in zip(["x", "residual", "weight", "bias", "x_bias"], grads, want):
        assert g.dtype == torch.float32 and g.shape == w64.shape, name
        assert (g.double() - w64).abs().max() < 1e-4 * max(1.0, w64.abs().max().item()), name


def test_add_layer_norm_matches_float64(backend):
    x, r = torch.randn(7, 384), torch.randn(7, 384)
    w, b, xb = torch.randn(384), torch.randn(384), torch.randn(384)
    y = ops.add_layer_norm(x, w, b, 1e-12, residual=r, x_bias=xb, activation="gelu")
    ref = torch.nn.functional.layer_norm(torch.nn.functional.gelu(x.double() + xb.double()) + r.double(), (384,),
                                         w.double(), b.double(), 1e-12)
    assert (y.double() - ref).abs().max() < 1e-5


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_gradcheck_bias_act(backend, activation):
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, c: ops.bias_act(a, c, activation), (x, b), eps=1e-6, atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("impl", ["auto", "cpp", "reference"])
@pytest.mark.parametrize("activation", ["gelu", "silu"])
def test_bias_act_without_bias_trains(monkeypatch, impl, activation):
    """bias_act(x, None) under autograd (a bias-free Linear before the activation, e.g. a frozen or bias-less FFN
    being fine-tuned): x's gradient against float64 autograd of torch's activation, and no gradient for the
    absent bias (an autograd formula that returns one for a None input fails in backward). gradcheck in float64
    (the reference) as well."""
    monkeypatch.setenv("BERTFAST_BACKEND", impl)
    torch.manual_seed(11)
    x = torch.randn(2, 3, 1023, requires_grad=True)
    dy = torch.randn(2, 3, 1023)
    y = ops.bias_act(x, None, activation)
    (grad,) = torch.autograd.grad(y, x, dy)
    x64 = x.detach().double().requires_grad_()
    act = torch.nn.functional.gelu if activation == "gelu" else torch.nn.functional.silu
    y64 = act(x64)
    (want,) = torch.autograd.grad(y64, x64, dy.double())
    assert grad.dtype == torch.float32 and grad.shape == x.shape
    assert (y.double() - y64).abs().max() < 1e-5
    assert (grad.double() - want).abs().max() < 1e-5
    if impl != "cpp":
        t = torch.randn(3, 1, 13, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a: ops.bias_act(a, None, activation), (t,), eps=1e-6, atol=1e-6,
                                        fast_mode=True)


@pytest.mark.parametrize("impl", ["auto", "cpp", "reference"])
def test_embed_without_type_table_trains(monkeypatch, impl):
    """embed of a model without token-type embeddings (DistilBERT: type_emb None, token_type_ids None) under
    autograd: the word / position / LayerNorm gradients against float64 autograd of the composite (padding rows
    of both tables zeroed), and no gradient for the absent type table."""
    monkeypatch.setenv("BERTFAST_BACKEND", impl)
    torch.manual_seed(12)
    n, e, vocab, n_pos = 10, 384, 13, 7
    idx = torch.tensor([0, 1, 2, 4, 5, 9])
    ids = torch.randint(0, vocab, (n,))
    ids[idx[1]] = 0
    pos = torch.randint(0, n_pos, (n,))
    pos[idx[2]] = 3
    tables = [torch.randn(vocab, e), torch.randn(n_pos, e), 1 + 0.1 * torch.randn(e), 0.1 * torch.randn(e)]
    leaves = [t.clone().requires_grad_() for t in tables]
    out = ops.embed(ids, idx, pos, None, leaves[0], leaves[1], None, leaves[2], leaves[3], 1e-12, padding_idx=0,
                    pos_padding_idx=3)
    dy = torch.randn(idx.numel(), e)
    grads = torch.autograd.grad(out, leaves, dy)
    l64 = [t.double().requires_grad_() for t in tables]
    h = torch.nn.functional.embedding(ids[idx], l64[0]) + torch.nn.functional.embedding(pos[idx], l64[1])
    ref = torch.nn.functional.layer_norm(h, (e,), l64[2], l64[3], 1e-12)
    want = list(torch.autograd.grad(ref, l64, dy.double()))
    want[0][0] = 0
    want[1][3] = 0
    assert (out.double() - ref).abs().max() < 1e-5
    for name, g, w in zip(["word", "pos", "ln_weight", "ln_bias"], grads, want):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        assert (g.double() - w).abs().max() < 1e-4, name


def test_gradcheck_embed_and_padding(backend):
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    unp = unpad_mask(mask)
    ids = torch.randint(0, 10, (8,))
    pos = torch.arange(4).repeat(2)
    types = torch.randint(0, 2, (8,))
    word, pemb, temb = (torch.randn(n, 6, dtype=torch.float64, requires_grad=True) for n in (10, 4, 2))
    lw, lb = torch.randn(6, dtype=torch.float64, requires_grad=True), torch.randn(6, dtype=torch.float64,
                                                                                  requires_grad=True)

    def f(word, pemb, temb, lw, lb):
        x = ops.embed(ids, unp.indices, pos, types, word, pemb, temb, lw, lb, 1e-5)
        return ops.pad(x, unp.indices, 2, 4)
    assert torch.autograd.gradcheck(f, (word, pemb, temb, lw, lb), eps=1e-6, atol=1e-6, fast_mode=True)
    h = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.unpad(t, unp.indices), (h,), eps=1e-6, atol=1e-6, fast_mode=True)
    # unpad takes repeated rows (a gather); their gradients add up, as index_select's do
    rep = torch.tensor([5, 1, 5, 0, 5])
    assert torch.autograd.gradcheck(lambda t: ops.unpad(t, rep), (h,), eps=1e-6, atol=1e-6, fast_mode=True)
    x = torch.randn(8, 6, requires_grad=True)
    dy = torch.randn(5, 6)
    ops.unpad(x, rep).backward(dy)
    assert torch.allclose(x.grad, torch.autograd.grad(x.index_select(0, rep), x, dy)[0])


def _opcheck_cases(impl):
    qkv, cu, m = _packed([3, 5], dtype=torch.float32)
    grad = {"requires_grad": True}
    cases = [
        (torch.ops.bertfast.add_layer_norm, (torch.randn(4, 8, **grad), torch.randn(8, **grad), torch.randn(8, **grad),
                                             1e-5, torch.randn(4, 8, **grad), torch.randn(8, **grad), "gelu", 0.0, 0,
                                             impl)),
        (torch.ops.bertfast.add_layer_norm, (torch.randn(4, 8, **grad), torch.randn(8, **grad), torch.randn(8, **grad),
                                             1e-5, None, None, "", 0.0, 0, impl)),
        # x + residual, no activation: their gradients are one tensor (the backward op must not return aliases)
        (torch.ops.bertfast.add_layer_norm, (torch.randn(4, 8, **grad), torch.randn(8, **grad), torch.randn(8, **grad),
                                             1e-5, torch.randn(4, 8, **grad), None, "", 0.0, 0, impl)),
        (torch.ops.bertfast.bias_act, (torch.randn(4, 8, **grad), torch.randn(8, **grad), "gelu_tanh", impl)),
        (torch.ops.bertfast.unpad, (torch.randn(6, 4, **grad), torch.tensor([0, 2, 5]), impl, True)),
        (torch.ops.bertfast.unpad, (torch.randn(6, 4, **grad), torch.tensor([2, 0, 2]), impl, False)),
        (torch.ops.bertfast.pad, (torch.randn(3, 4, **grad), torch.tensor([0, 2, 5]), 6, impl)),
        (torch.ops.bertfast.embed, (torch.randint(0, 9, (6,)), torch.tensor([0, 2, 5]), torch.arange(6),
                                    torch.randint(0, 2, (6,)), torch.randn(9, 4, **grad), torch.randn(6, 4, **grad),
                                    torch.randn(2, 4, **grad), torch.randn(4, **grad), torch.randn(4, **grad), 1e-5,
                                    0, 1, impl)),
    ]
    if impl == "reference":
        cases.append((torch.ops.bertfast.varlen_attention, (qkv.requires_grad_(), cu, m, 0.2, 0.0, 0, impl)))
    return cases


def _fake_matches_real(op, args):
    """op's outputs under FakeTensorMode (what torch.compile / export see) against a real call: same structure,
    shapes, dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = op(*args)
    with FakeTensorMode() as mode:
        fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real = list(real) if isinstance(real, (tuple, list)) else [real]
    fake = list(fake) if isinstance(fake, (tuple, list)) else [fake]
    assert len(real) == len(fake), op
    for i, (r, f) in enumerate(zip(real, fake)):
        assert (r is None) == (f is None), (op, i)
        if r is not None:
            assert (tuple(f.shape), f.dtype) == (tuple(r.shape), r.dtype), (op, i, tuple(f.shape), f.dtype,
                                                                             tuple(r.shape), r.dtype)


@pytest.mark.parametrize("impl", ["reference", "cpp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_fake_implementations_match_real_outputs(impl, dtype):
    """The fake (meta) implementation of every bertfast:: op gives the shapes and dtypes its real implementation
    returns, beyond opcheck's fp32 cases: half-precision and float64 inputs (the statistics stay fp32), dropout
    (the C++ forward's keep bits, ceil(H / 8) bytes a row: H = 1023), absent optional inputs (bias, residual,
    type table)."""
    if impl == "cpp" and dtype == torch.float64:
        pytest.skip("the C++ kernels take float32, float16, bfloat16")
    torch.manual_seed(21)
    bf = torch.ops.bertfast
    n, h = 3, 1023
    x, r, dy = (torch.randn(n, h).to(dtype) for _ in range(3))
    w, b, xb = (torch.randn(h).to(dtype) for _ in range(3))
    for act, p, res, xbias in (("gelu", 0.0, r, xb), ("", 0.0, r, None), ("", 0.2, r, xb), ("relu", 0.3, None, None)):
        y, mean, rstd, keep = bf.add_layer_norm(x, w, b, 1e-5, res, xbias, act, p, 7, impl)
        _fake_matches_real(bf.add_layer_norm, (x, w, b, 1e-5, res, xbias, act, p, 7, impl))
        _fake_matches_real(bf.add_layer_norm_backward, (dy, x, w, b, mean, rstd, 1e-5, res, xbias, act, p, 7, impl,
                                                        keep))
    for bias in (xb, None):
        _fake_matches_real(bf.bias_act, (x, bias, "gelu_tanh", impl))
        _fake_matches_real(bf.bias_act_backward, (dy, x, bias, "silu", impl))
    ids, idx, pos = torch.randint(0, 9, (6,)), torch.tensor([0, 2, 5]), torch.arange(6)
    word, pemb, temb = torch.randn(9, 384).to(dtype), torch.randn(6, 384).to(dtype), torch.randn(2, 384).to(dtype)
    lw, lb = torch.randn(384).to(dtype), torch.randn(384).to(dtype)
    for tt, te in ((torch.randint(0, 2, (6,)), temb), (None, None)):
        out, mean, rstd = bf.embed(ids, idx, pos, tt, word, pemb, te, lw, lb, 1e-5, 0, 1, impl)
        _fake_matches_real(bf.embed, (ids, idx, pos, tt, word, pemb, te, lw, lb, 1e-5, 0, 1, impl))
        _fake_matches_real(bf.embed_backward, (torch.randn_like(out), ids, idx, pos, tt, word, pemb, te, lw, lb,
                                               mean, rstd, 1e-5, 0, 1, impl))
    _fake_matches_real(bf.unpad, (x, torch.tensor([2, 0]), impl, True))
    _fake_matches_real(bf.pad, (x, torch.tensor([4, 0, 2]), 5, impl, False))
    if impl == "reference":
        qkv, cu = torch.randn(7, 3, 2, 32).to(dtype), torch.tensor([0, 1, 7], dtype=torch.int32)
        out, lse = bf.varlen_attention(qkv, cu, 6, 0.2, 0.0, 0, impl)
        _fake_matches_real(bf.varlen_attention, (qkv, cu, 6, 0.2, 0.1, 3, impl))
        _fake_matches_real(bf.varlen_attention_backward, (torch.randn_like(out), qkv, out, lse, cu, 6, 0.2, 0.0, 0,
                                                          impl))


@pytest.mark.parametrize("impl", ["reference", "cpp"])
def test_opcheck_every_op(impl):
    """torch.library.opcheck, all of its checks: schema, fake (meta) implementation, autograd registration, and
    AOTAutograd tracing forward + backward with dynamic shapes (it traces outside dynamo: the C++ implementation's
    backward formula reached bertfast_C kernels with fake tensors)."""
    if impl == "cpp":
        assert ops.cpp_extension_error() is None
    for op, args in _opcheck_cases(impl):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_bias_act_in_place(backend, activation, dtype):
    """ops.bias_act_ writes bias_act's output over x and returns x, with any backend."""
    x = torch.randn(3, 5, 67).to(dtype)
    b = torch.randn(67).to(dtype)
    want = ops.bias_act(x, b, activation)
    got = x.clone()
    assert ops.bias_act_(got, b, activation) is got
    assert torch.equal(got, want)
    empty = torch.empty(0, 67, dtype=dtype)
    assert ops.bias_act_(empty, b, activation) is empty


def test_bias_act_in_place_bad_input():
    x, b = torch.randn(4, 6), torch.randn(6)
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.bias_act_(x.t().contiguous().t(), b)
    with pytest.raises(ValueError, match="records no gradient"):
        ops.bias_act_(x.clone().requires_grad_(), b)
    with pytest.raises(ValueError, match="records no gradient"):
        ops.bias_act_(x.clone(), b.clone().requires_grad_())
    with torch.no_grad():  # parameters that require grad are fine where no gradient is recorded
        ops.bias_act_(x.clone(), b.clone().requires_grad_())
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_act_(x.clone(), torch.randn(5))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.bias_act_(x.clone(), b, "tanh")


def test_bias_act_in_place_marks_x_modified():
    """A graph that saved x before bias_act_ wrote over it refuses to run backward, as it does for torch's relu_."""
    a = torch.randn(4, 6, requires_grad=True)
    y = a * 2
    z = (y * y).sum()  # saves y
    with torch.no_grad():
        ops.bias_act_(y, None, "relu")
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        z.backward()


def test_encoder_trains_a_bias_of_frozen_weights():
    """Only the FFN bias trainable: the forward records its gradient, so the activation is not written in place."""
    import bertfast
    from helpers import bert_config, hf_bert, random_batch
    model = bertfast.BertModel.from_hf(hf_bert(bert_config(layers=1)))
    for p in model.parameters():
        p.requires_grad_(False)
    bias = model.encoder.layer[0].intermediate.dense.bias
    bias.requires_grad_(True)
    ids, mask, types = random_batch(2, 7, 211)
    model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0


def test_encoder_inference_on_cpu_activates_in_place(monkeypatch):
    """The encoder's FFN activation runs in place on the CPU when no gradient is recorded, out of place when
    one is, with identical outputs."""
    import bertfast
    from helpers import bert_config, hf_bert, random_batch
    hf = hf_bert(bert_config(layers=2))
    model = bertfast.BertModel.from_hf(hf).eval()
    ids, mask, types = random_batch(3, 11, hf.config.vocab_size)
    calls = []
    real_inplace = ops.bias_act_
    monkeypatch.setattr(ops, "bias_act_", lambda *a: calls.append(1) or real_inplace(*a))
    with torch.no_grad():
        out_inference = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert len(calls) == 2  # one per layer
    calls.clear()
    out_grad = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    assert not calls and out_grad.requires_grad
    assert torch.equal(out_inference, out_grad.detach())


def test_choose_reports_and_respects_forced_backend(monkeypatch):
    monkeypatch.setenv("BERTFAST_BACKEND", "reference")
    assert ops.choose("add_layer_norm", torch.device("cpu"), dtype=torch.float32, hidden=64) == "reference"
    monkeypatch.setenv("BERTFAST_BACKEND", "cpp")
    # there is no C++ attention: the reference runs, with a notice
    assert ops.choose("varlen_attention", torch.device("cpu"), dtype=torch.float32, head_dim=64) == "reference"
    assert any("has no cpp implementation" in v for v in ops.notices().values())
    monkeypatch.setenv("BERTFAST_BACKEND", "auto")
    table = ops.implementation_table("cpu")
    assert set(table) == set(ops.PREFERENCE)


def test_implementation_table_names_what_was_skipped_and_what_was_forced(monkeypatch):
    """implementation_table (what `bertfast info` prints): under auto, an op's first choice alone, or the
    implementation that runs followed by each skipped one and why; under a forced backend, that backend, or the
    reference and why (the op has no such implementation), or the error a call would raise - never a silent
    fallback."""
    if ops.cpp_extension_error():
        pytest.skip("needs bertfast._C")
    monkeypatch.setattr(ops, "_notices", {})
    monkeypatch.delenv("BERTFAST_BACKEND", raising=False)
    real = ops._available

    def no_cpp(impl, op, device):
        return "test: no cpp" if impl == "cpp" else real(impl, op, device)
    table = ops.implementation_table("cpu")
    for op in ("add_layer_norm", "bias_act", "embed", "unpad", "pad"):
        assert table[op] == "cpp", (op, table[op])
    monkeypatch.setattr(ops, "_available", no_cpp)
    assert ops.implementation_table("cpu")["add_layer_norm"] == "reference  (cpp: test: no cpp)"
    monkeypatch.setattr(ops, "_available", real)
    monkeypatch.setenv("BERTFAST_BACKEND", "cpp")
    table = ops.implementation_table("cpu")
    assert table["add_layer_norm"] == "cpp"
    assert table["varlen_attention"].startswith(
        "reference  (BERTFAST_BACKEND=cpp: varlen_attention has no cpp implementation)")
    monkeypatch.setattr(ops, "_available", no_cpp)
    assert ops.implementation_table("cpu")["add_layer_norm"] == (
        "error: BERTFAST_BACKEND=cpp: the cpp implementation of add_layer_norm cannot run here: test: no cpp. "
        "Unset BERTFAST_BACKEND (auto) to use another implementation.")
    # on CUDA (the C++ kernels stood in as available): the embedding's backward is torch's, and the table says so
    monkeypatch.delenv("BERTFAST_BACKEND")
    monkeypatch.setattr(ops, "_available",
                        lambda impl, op, device: None if impl == "cpp" else real(impl, op, device))
    assert ops.implementation_table("cuda")["embed"] == (
        "cpp  (backward: torch autograd of the reference; bertfast._C has no CUDA embed backward)")


def test_auto_add_layer_norm_trains_rows_wider_than_the_fused_backward(monkeypatch):
    """The Triton LayerNorm's forward takes rows up to 8192 but its backward up to 4096, and a backward runs its
    forward's implementation: auto (CUDA's preference order; without a GPU in the interpreter) picks Triton for
    such rows only when no gradient is recorded. It used to pick it regardless, and backward raised."""
    from bertfast.kernels.config import MAX_FUSED_BACKWARD_HIDDEN
    dev = torch.device(KERNEL_DEVICE)
    if dev.type == "cpu":
        monkeypatch.setitem(ops.PREFERENCE, "add_layer_norm", dict(ops.PREFERENCE["add_layer_norm"],
                                                                   cpu=ops.PREFERENCE["add_layer_norm"]["cuda"]))
    h = MAX_FUSED_BACKWARD_HIDDEN + 4
    x = torch.randn(2, h, device=dev, requires_grad=True)
    w, b = torch.rand(h, device=dev) + 0.5, torch.randn(h, device=dev)
    assert ops.choose("add_layer_norm", dev, dtype=x.dtype, hidden=h) == "triton"
    assert ops.choose("add_layer_norm", dev, dtype=x.dtype, hidden=h, records_grad=True) != "triton"
    y = ops.add_layer_norm(x, w, b, 1e-5)
    (grad,) = torch.autograd.grad((y * y[0]).sum(), x)
    x64 = x.detach().double().requires_grad_()
    y64 = torch.nn.functional.layer_norm(x64, (h,), w.double(), b.double(), 1e-5)
    (want,) = torch.autograd.grad((y64 * y64[0]).sum(), x64)
    assert torch.allclose(grad.double(), want, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(ops.add_layer_norm(x, w, b, 1e-5).double(), y64, atol=1e-5)


@pytest.mark.parametrize("activation", ["gelu", None])
@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_add_layer_norm_dropout_gradients_use_the_forward_mask(monkeypatch, impl, activation):
    """Training through bertfast.ops.add_layer_norm with dropout: the backward applies the forward's mask (the
    C++ kernel reads the keep bits its forward saved, the reference draws it again from the saved seed). The kept
    elements are read off the forward itself (dropped ones carry no x gradient), then float64 autograd with that
    mask must give the same gradients (a mask that differs between forward and backward shows as O(1) errors,
    far above the fp32 noise the bound leaves room for). Without an activation (every layer's dense + dropout +
    residual + LayerNorm) dresidual is not dx: dx carries the mask and 1 / (1 - p), dresidual neither."""
    monkeypatch.setenv("BERTFAST_BACKEND", impl)
    backward_keeps = []
    real_backward = ops._add_layer_norm_backward_op._init_fn
    monkeypatch.setattr(ops._add_layer_norm_backward_op, "_init_fn",
                        lambda *a: backward_keeps.append(a[-1]) or real_backward(*a))
    n, h, p = 9, 384, 0.3
    x, r = torch.randn(n, h, requires_grad=True), torch.randn(n, h, requires_grad=True)
    w, b, xb = (torch.randn(h, requires_grad=True) for _ in range(3))
    y = ops.add_layer_norm(x, w, b, 1e-12, residual=r, x_bias=xb, activation=activation, dropout_p=p)
    dy = torch.randn(n, h)
    grads = torch.autograd.grad(y, (x, r, w, b, xb), dy)
    # the C++ backward got the forward's keep bits (the others none: they draw the mask again)
    assert [k.shape for k in backward_keeps] == [(n, h // 8) if impl == "cpp" else (0,)]
    keep = grads[0] != 0                        # gelu' is never exactly 0 on these inputs
    assert 0.6 < keep.float().mean().item() < 0.8
    leaves = [t.detach().double().requires_grad_() for t in (x, r, w, b, xb)]
    act = torch.nn.functional.gelu if activation else (lambda t: t)
    z = torch.where(keep, act(leaves[0] + leaves[4]) / (1 - p), 0.0) + leaves[1]
    ref = torch.nn.functional.layer_norm(z, (h,), leaves[2], leaves[3], 1e-12)
    assert (y.double() - ref).abs().max() < 1e-4
    for g, ref_g in zip(grads, torch.autograd.grad(ref, leaves, dy.double())):
        assert (g.double() - ref_g).abs().max() < 1e-4 * max(1.0, ref_g.abs().max().item())


@pytest.mark.parametrize("impl", ["cpp", "triton", "reference"])
def test_dropout_masks_are_fresh_per_call_and_follow_manual_seed(monkeypatch, impl):
    """Each add_layer_norm / varlen_attention call with dropout draws its own mask (a fixed seed would drop the
    same elements in every layer and step), and torch.manual_seed repeats them."""
    monkeypatch.setenv("BERTFAST_BACKEND", impl)
    x, w, b = torch.randn(5, 96), torch.randn(96), torch.randn(96)
    qkv, cu = torch.randn(12, 3, 2, 32), torch.tensor([0, 5, 12], dtype=torch.int32)
    calls = (lambda: ops.add_layer_norm(x, w, b, 1e-5, dropout_p=0.5),
             lambda: ops.varlen_attention(qkv, cu, 7, dropout_p=0.5))
    for call in calls:
        torch.manual_seed(3)
        first, second = call(), call()
        torch.manual_seed(3)
        assert not torch.equal(first, second) and torch.equal(call(), first)


def _grads(fn, inputs, seed=0):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs if o.is_floating_point())
    loss.backward()
    return [o.detach() for o in outs], [t.grad for t in leaves if t.is_floating_point()]


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_eager_autograd_path_matches_the_registered_op(impl):
    """Eager calls that need gradients run the op's implementation and backward formula through a
    torch.autograd.Function (no dispatcher trip); they must give what the registered custom op's autograd gives,
    and must actually take that path."""
    import bertfast._C  # noqa: F401 - the cpp implementations call torch.ops.bertfast_C
    torch.manual_seed(0)
    x, r = torch.randn(5, 24), torch.randn(5, 24)
    w, b, xb = torch.randn(24), torch.randn(24), torch.randn(24)
    u, ub = torch.randn(5, 40), torch.randn(40)
    qkv, cu, m = _packed([2, 3], dtype=torch.float32)
    idx = torch.tensor([0, 2, 5])
    cases = [
        (ops._add_layer_norm_op, [x, w, b, 1e-5, r, xb, "gelu", 0.0, 0, impl]),
        (ops._add_layer_norm_op, [x, w, b, 1e-5, r, None, "", 0.0, 0, impl]),   # dresidual = dx
        (ops._add_layer_norm_op, [x, w, b, 1e-5, r, xb, "", 0.2, 123, impl]),   # dropout
        (ops._bias_act_op, [u, ub, "gelu", impl]),
        (ops._varlen_attention_op, [qkv, cu, m, 0.2, 0.0, 0, "reference"]),
        (ops._unpad_op, [torch.randn(6, 4), idx, impl, True]),
        (ops._unpad_op, [torch.randn(6, 4), torch.tensor([5, 1, 5, 5]), impl, False]),  # repeats accumulate
        (ops._pad_op, [torch.randn(3, 4), idx, 6, impl]),
    ]
    assert all(op in ops._EAGER_AUTOGRAD for op, _ in cases)
    for op, args in cases:
        tensors = [a for a in args if isinstance(a, torch.Tensor)]

        def call(fn):
            def f(*leaves):
                it = iter(leaves)
                return fn(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])
            return f
        calls = []
        eager = ops._EAGER_AUTOGRAD[op]
        original = eager.apply

        def counted(*a, _original=original):
            calls.append(1)
            return _original(*a)
        eager.apply = counted
        try:
            out_e, g_e = _grads(call(lambda *a: ops._run(op, *a)), tensors)
        finally:
            eager.apply = original
        assert calls, f"{op._name}: the eager autograd path was not taken"
        out_r, g_r = _grads(call(op), tensors)
        for a, c in zip(out_e + g_e, out_r + g_r):
            assert (a is None) == (c is None)
            if a is not None:   # bit for bit (the reference attention's lse placeholder is NaN in both)
                torch.testing.assert_close(a, c, rtol=0, atol=0, equal_nan=True, msg=op._name)


def test_fp32_attention_precision_follows_torch_settings():
    """fp32 attention's dot precision follows torch's fp32 matmul setting, old API or new: after
    torch.backends.cuda.matmul.fp32_precision = "tf32", reading allow_tf32 raises, which failed every attention
    call on the Triton path."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision, torch.backends.fp32_precision
    try:
        assert ops._fp32_precision(torch.float32) == ("tf32" if matmul.allow_tf32 else "ieee")
        assert ops._fp32_precision(torch.float16) == "tf32"    # unused by fp16 / bf16 dots
        matmul.fp32_precision = "tf32"
        assert ops._fp32_precision(torch.float32) == "tf32"
        matmul.fp32_precision = "ieee"
        assert ops._fp32_precision(torch.float32) == "ieee"
        matmul.fp32_precision = "none"
        torch.backends.fp32_precision = "tf32"   # the generic setting, inherited by matmul's "none"
        assert ops._fp32_precision(torch.float32) == "tf32"
    finally:
        torch.backends.fp32_precision = saved[1]
        matmul.fp32_precision = saved[0]


def test_triton_on_cpu_needs_interpreted_kernels(monkeypatch):
    """Triton fixes a kernel's mode when it is defined: CPU tensors are served only when the op's kernel module
    holds interpreted kernels (directly or inside an autotuner), whatever TRITON_INTERPRET says at call time;
    otherwise a forced BERTFAST_BACKEND=triton is an error naming the reason (it used to fail in Triton's
    launcher on a GPU machine)."""
    import types

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    def body(x_ptr):
        pass
    compiled = types.ModuleType("compiled_kernels")
    compiled.kernel, compiled.helper, compiled.N = JITFunction(body), len, 3
    interpreted = types.ModuleType("interpreted_kernels")
    interpreted.tuned = Autotuner(InterpretedFunction(body), ["x_ptr"], [], [], None, None)
    assert not ops._interpreted(compiled) and ops._interpreted(interpreted)

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(ops, "triton_module", lambda op: compiled)
    ops._available_cached.cache_clear()
    try:
        reason = ops._available("triton", "add_layer_norm", torch.device("cpu"))
        assert reason and "only in the interpreter" in reason
        monkeypatch.setenv("BERTFAST_BACKEND", "triton")
        with pytest.raises(ops.BackendError, match="only in the interpreter"):
            ops.add_layer_norm(torch.randn(2, 8), torch.ones(8), torch.zeros(8), 1e-5)
        monkeypatch.setattr(ops, "triton_module", lambda op: interpreted)
        ops._available_cached.cache_clear()
        assert ops._available("triton", "add_layer_norm", torch.device("cpu")) is None
    finally:
        ops._available_cached.cache_clear()


@pytest.mark.parametrize("hidden", [64, 312])
def test_forward_launchers_skip_checks_only_behind_the_ops_layer(monkeypatch, hidden):
    """bertfast.ops calls the Triton forward launchers with validate=False (it has checked the same inputs; NOTES
    change 31), with the same result as a validated launch; the launchers called directly still check, and bad
    input through bertfast.ops is still refused before any launch."""
    monkeypatch.setenv("BERTFAST_BACKEND", "triton")
    from bertfast.kernels import gelu, layer_norm
    seen = []
    for mod, name in ((layer_norm, "add_layer_norm_forward"), (gelu, "bias_act_forward")):
        real_fn = getattr(mod, name)

        def record(*args, _real=real_fn, _name=name, **kwargs):
            seen.append((_name, kwargs.get("validate", True)))
            return _real(*args, **kwargs)
        monkeypatch.setattr(mod, name, record)
    x, r = (torch.randn(7, hidden, device=KERNEL_DEVICE) for _ in range(2))
    w, b, xb = (torch.randn(hidden, device=KERNEL_DEVICE) for _ in range(3))
    with torch.no_grad():
        y = ops.add_layer_norm(x, w, b, 1e-5, residual=r, x_bias=xb, activation="gelu")
        g = ops.bias_act(x, xb, "gelu_tanh")
    assert seen == [("add_layer_norm_forward", False), ("bias_act_forward", False)]
    checked = layer_norm.add_layer_norm_forward(x, w, b, 1e-5, r, xb, "gelu")[0]
    assert torch.equal(y, checked)
    assert torch.equal(g, gelu.bias_act_forward(x, xb, "gelu_tanh"))
    seen.clear()
    with pytest.raises(ValueError, match="residual must have shape"):
        ops.add_layer_norm(x, w, b, 1e-5, residual=r[:3])
    with pytest.raises(ValueError, match="bias has dtype torch.float16"):
        ops.bias_act(x, xb.half(), "gelu")
    with pytest.raises(ValueError, match="activation must be"):
        ops.add_layer_norm(x, w, b, 1e-5, activation="tanh")
    assert seen == []
    with pytest.raises(layer_norm.UnsupportedInput, match="x_bias must have shape"):
        layer_norm.add_layer_norm_forward(x, w, b, 1e-5, r, xb[:5])
    with pytest.raises(gelu.UnsupportedInput, match="x must be contiguous"):
        gelu.bias_act_forward(x.t(), None, "gelu")
    # the registered ops (torch.compile, direct torch.ops.bertfast calls) keep the launchers' checks
    seen.clear()
    with pytest.raises(gelu.UnsupportedInput, match="x must be contiguous"):
        torch.ops.bertfast.bias_act(x.t(), None, "gelu", "triton")
    with pytest.raises(layer_norm.UnsupportedInput, match="weight must be contiguous"):
        torch.ops.bertfast.add_layer_norm(x, torch.randn(hidden, 2, device=KERNEL_DEVICE)[:, 0], b, 1e-5, None,
                                          None, "", 0.0, 0, "triton")
    assert seen == [("bias_act_forward", True), ("add_layer_norm_forward", True)]


@pytest.mark.parametrize("fast", [True, False])
def test_settings_follow_the_environment(monkeypatch, fast):
    """ops.setting reads the environment at each call, through os.environ's own dict on POSIX or os.environ.get:
    an assignment, a deletion, blanks and case all count."""
    import os
    if not fast:
        monkeypatch.setattr(ops, "_ENVIRON_TYPE", None)
    monkeypatch.delenv("BERTFAST_BACKEND", raising=False)
    assert ops.backend_setting() == "auto"
    os.environ["BERTFAST_BACKEND"] = " Reference "
    try:
        assert ops.backend_setting() == "reference"
        os.environ["BERTFAST_BACKEND"] = ""
        assert ops.backend_setting() == "auto"
        monkeypatch.setenv("BERTFAST_BACKEND", "bogus")
        with pytest.raises(ValueError, match="BERTFAST_BACKEND='bogus' is not one of"):
            ops.backend_setting()
    finally:
        os.environ.pop("BERTFAST_BACKEND", None)
    assert ops.backend_setting() == "auto"
    assert ops.setting("BERTFAST_NO_SUCH_SETTING_X", "dflt") == "dflt"


def test_func_grad_through_an_op_is_refused_by_name():
    """torch.func.grad / vjp / jacrev through a bertfast op fail inside torch's custom-op autograd (with a message
    about autograd.Function's setup_context): refused by name. An op whose inputs the transform does not
    differentiate (a frozen encoder under a head's grad) runs."""
    x, w, b = torch.randn(4, 16), torch.randn(16), torch.randn(16)
    message = "bertfast::add_layer_norm cannot be differentiated by torch.func.grad / vjp / jacrev"
    f = lambda a: ops.add_layer_norm(a, w, b, 1e-5).pow(2).sum()          # noqa: E731
    for transform in (lambda: torch.func.grad(f)(x), lambda: torch.func.vjp(f, x)[1](torch.tensor(1.0)),
                      lambda: torch.func.jacrev(lambda a: ops.add_layer_norm(a, w, b, 1e-5))(x)):
        with pytest.raises(NotImplementedError, match=message):
            transform()
    head = torch.randn(16)
    g = torch.func.grad(lambda h: ops.add_layer_norm(x, w, b, 1e-5) @ h @ torch.ones(4))(head)
    torch.testing.assert_close(g, torch.nn.functional.layer_norm(x, (16,), w, b, 1e-5).sum(0))


def test_forward_mode_ad_is_refused_not_dropped():
    """The ops have reverse-mode formulas only: a dual tensor (torch.autograd.forward_ad) or torch.func.jvp /
    jacfwd through them raises, instead of returning outputs without a tangent (a silent zero). Tensors without a
    tangent under a dual level, and vmap, run."""
    import torch.autograd.forward_ad as fwAD
    x, t = torch.randn(5, 16), torch.randn(5, 16)
    w, b = torch.randn(16), torch.randn(16)
    message = "has no forward-mode AD .jvp. formula"
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, t)
        with pytest.raises(NotImplementedError, match="bertfast::bias_act " + message):
            ops.bias_act(dual, b, "gelu")
        with pytest.raises(NotImplementedError, match="bertfast::add_layer_norm " + message):
            ops.add_layer_norm(x, w, b, 1e-5, residual=dual)
        torch.testing.assert_close(ops.bias_act(x, b, "gelu"), torch.nn.functional.gelu(x + b))
    for transform in (lambda f: torch.func.jvp(f, (x,), (t,)), lambda f: torch.func.jacfwd(f)(x)):
        with pytest.raises(NotImplementedError, match=message):
            transform(lambda a: ops.add_layer_norm(a, w, b, 1e-5))
    # a bertfast op that sees no tangent (a frozen encoder under a head's jvp) runs
    head = torch.randn(16, 3)
    out, tangent = torch.func.jvp(lambda h: ops.bias_act(x, b, "gelu") @ h, (head,), (torch.ones(16, 3),))
    torch.testing.assert_close(tangent, torch.nn.functional.gelu(x + b) @ torch.ones(16, 3))
    # vmap over dual inputs keeps the refusal
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match=message):
            torch.func.vmap(lambda a: ops.bias_act(a, b, "relu"))(fwAD.make_dual(x.view(5, 1, 16), t.view(5, 1, 16)))
    y = torch.func.vmap(lambda a: ops.bias_act(a, b, "relu"))(x.view(5, 1, 16))
    torch.testing.assert_close(y.view(5, 16), torch.relu(x + b))


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu", "silu"])
def test_reference_implementations_match_float64(monkeypatch, activation):
    """The reference implementations (the definition the kernels are tested against) against independent float64
    formulas: each activation of bias_act and of add_layer_norm (the MLM head's transform), embed reading type 0
    for every token when token_type_ids is None, and pad writing zeros at the padded positions."""
    monkeypatch.setenv("BERTFAST_BACKEND", "reference")
    torch.manual_seed(31)
    formulas = {"gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2 ** 0.5)),
                "gelu_tanh": lambda z: 0.5 * z * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (z + 0.044715 * z ** 3))),
                "relu": lambda z: z.clamp(min=0), "silu": lambda z: z / (1 + torch.exp(-z))}
    act = formulas[activation]
    x, xb = 3 * torch.randn(5, 1023), torch.randn(1023)
    want = act(x.double() + xb.double())
    assert (ops.bias_act(x, xb, activation).double() - want).abs().max() < 1e-5
    w, b = 1 + 0.1 * torch.randn(1023), 0.1 * torch.randn(1023)
    y = ops.add_layer_norm(x, w, b, 1e-12, x_bias=xb, activation=activation)
    mu, var = want.mean(-1, keepdim=True), want.var(-1, unbiased=False, keepdim=True)
    assert (y.double() - ((want - mu) / (var + 1e-12).sqrt() * w.double() + b.double())).abs().max() < 1e-4
    if activation == "gelu":
        ids, idx, pos = torch.randint(0, 9, (6,)), torch.tensor([0, 2, 5]), torch.arange(6)
        word, pemb, temb = torch.randn(9, 384), torch.randn(6, 384), torch.randn(2, 384)
        lw, lb = torch.ones(384), torch.zeros(384)
        out = ops.embed(ids, idx, pos, None, word, pemb, temb, lw, lb, 1e-12)
        h = (word[ids[idx]] + temb[0] + pemb[pos[idx]]).double()
        ref = (h - h.mean(-1, keepdim=True)) / (h.var(-1, unbiased=False, keepdim=True) + 1e-12).sqrt()
        assert (out.double() - ref).abs().max() < 1e-4
        rows = torch.randn(3, 7)
        padded = ops.pad(rows, torch.tensor([4, 0, 2]), 2, 3)
        assert padded.shape == (2, 3, 7)
        assert torch.equal(padded.view(6, 7)[[1, 3, 5]], torch.zeros(3, 7))
        assert torch.equal(padded.view(6, 7)[[4, 0, 2]], rows)


def test_choose_limits_are_inclusive_and_see_the_call():
    """The Triton kernels' limits (LayerNorm rows up to MAX_FUSED_HIDDEN, backward up to MAX_FUSED_BACKWARD_HIDDEN,
    attention grids of up to MAX_GRID_YZ sequences and heads) are inclusive, and varlen_attention asks choose()
    about its actual batch and head count."""
    from bertfast.kernels.attention import MAX_GRID_YZ
    from bertfast.kernels.config import MAX_FUSED_BACKWARD_HIDDEN, MAX_FUSED_HIDDEN
    sup = ops._supports
    assert sup("triton", "add_layer_norm", dict(dtype=torch.float16, hidden=MAX_FUSED_HIDDEN), "cuda") is None
    assert "hidden size" in sup("triton", "add_layer_norm", dict(dtype=torch.float16, hidden=MAX_FUSED_HIDDEN + 1),
                                "cuda")
    grad = dict(dtype=torch.float16, records_grad=True)
    assert sup("triton", "add_layer_norm", dict(grad, hidden=MAX_FUSED_BACKWARD_HIDDEN), "cuda") is None
    assert "gradient" in sup("triton", "add_layer_norm", dict(grad, hidden=MAX_FUSED_BACKWARD_HIDDEN + 1), "cuda")
    att = dict(dtype=torch.float16, head_dim=64)
    assert sup("triton", "varlen_attention", dict(att, sequences=MAX_GRID_YZ, heads=MAX_GRID_YZ), "cuda") is None
    assert "at most" in sup("triton", "varlen_attention", dict(att, sequences=2, heads=MAX_GRID_YZ + 1), "cuda")
    seen = []
    real = ops.choose
    try:
        ops.choose = lambda op, device, **facts: seen.append((op, facts)) or real(op, device, **facts)
        ops.varlen_attention(torch.randn(9, 3, 5, 32), torch.tensor([0, 2, 2, 9], dtype=torch.int32), 7)
    finally:
        ops.choose = real
    assert seen == [("varlen_attention", dict(dtype=torch.float32, head_dim=32, sequences=3, heads=5))]
