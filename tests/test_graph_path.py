"""The CUDA-graph forward's padding-free path (enable_cuda_graphs), without a GPU: the fixed-length unpadding it
captures (bertfast.padding.unpad_mask_fixed, token_bucket) against unpad_mask, and the graphed forward's
static-buffer function run uncaptured on CPU (EncoderModel._graph_forward(..., capture=False)) against the eager
forward, for every family, with buffers reused across batches of one bucket. The captured version runs in
test_gpu_model.py where CUDA is present."""
import copy

import pytest
import torch

import bertfast
from bertfast.padding import graph_width, token_bucket, unpad_mask, unpad_mask_fixed
from test_families import BASE, FAMILIES, family_config


@pytest.mark.parametrize("seqlen", [1, 7, 16, 77, 128, 512])
def test_token_bucket_bounds(seqlen):
    for batch in (1, 2, 5, 32):
        n = batch * seqlen
        totals = sorted({1, 2, n - 1, n} | set(torch.randint(1, n + 1, (200,)).tolist()))
        for total in (t for t in totals if 1 <= t <= n):
            bucket = token_bucket(total, batch, seqlen)
            assert total <= bucket <= n, (total, batch, seqlen, bucket)
            assert bucket - total < seqlen, (total, batch, seqlen, bucket)        # fillers fit one sequence
            assert bucket - total < max(16, total / 4), (total, batch, seqlen, bucket)


def test_graph_width():
    # the model's positions (512-position models: every padded length shares a width), bounded to the next power
    # of two >= the padded length for longer models, never below the padded length (position_ids may allow that)
    assert [graph_width(s, 512) for s in (1, 100, 512)] == [512, 512, 512]
    assert [graph_width(s, 72) for s in (1, 72, 80)] == [72, 72, 80]
    assert [graph_width(s, 4096) for s in (16, 512, 513, 1000, 2049, 4096, 5000)] == \
        [512, 512, 1024, 1024, 4096, 4096, 5000]


def _masks(batch, seqlen, generator):
    """Right-padded, left-padded, holes, and rows with no real token (never all rows)."""
    lengths = torch.randint(0, seqlen + 1, (batch,), generator=generator)
    lengths[0] = max(int(lengths[0]), 1)
    right = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    left = right.flip(1)
    holes = (torch.rand(batch, seqlen, generator=generator) < 0.6).long()
    holes[0, 0] = 1
    return [right, left, holes]


@pytest.mark.parametrize("batch,seqlen", [(1, 1), (1, 9), (3, 17), (6, 64)])
def test_unpad_mask_fixed_matches_unpad_mask(batch, seqlen):
    g = torch.Generator().manual_seed(batch * 100 + seqlen)
    for mask in _masks(batch, seqlen, g):
        ref = unpad_mask(mask)
        total = ref.total
        for packed in sorted({total, token_bucket(total, batch, seqlen), min(total + seqlen - 1, batch * seqlen)}):
            unp = unpad_mask_fixed(mask, packed)
            assert unp.total == packed and (unp.batch, unp.seqlen, unp.max_seqlen) == (batch, seqlen, seqlen)
            assert torch.equal(unp.indices[:total], ref.indices)
            fillers = unp.indices[total:]
            padding = torch.nonzero(mask.reshape(-1) == 0).flatten()
            assert torch.equal(fillers, padding[:packed - total])        # the first padding positions, in order
            assert torch.equal(unp.seqlens, ref.seqlens)
            assert torch.equal(unp.cu_seqlens[:batch + 1], ref.cu_seqlens)
            assert unp.cu_seqlens.shape == (batch + 2,) and int(unp.cu_seqlens[-1]) == packed
            assert unp.cu_seqlens.dtype == torch.int32
            assert torch.equal(unp.first_token, ref.first_token)


@pytest.mark.parametrize("batch,seqlen", [(1, 1), (3, 17), (6, 64)])
def test_unpad_mask_fields(batch, seqlen):
    """unpad_mask's public fields from their definitions (the model passes max_seqlen on, and callers of
    bertfast.padding use it for the attention's tiling): the real tokens' flat positions in order, per-sequence
    counts, their offsets, the longest count; all-padding rows count 0, an all-padding batch has max_seqlen 0."""
    g = torch.Generator().manual_seed(batch * 31 + seqlen)
    for mask in _masks(batch, seqlen, g) + [torch.zeros(batch, seqlen, dtype=torch.long)]:
        unp = unpad_mask(mask)
        counts = [int(row.sum()) for row in mask]
        assert unp.indices.tolist() == [i for i, m in enumerate(mask.reshape(-1).tolist()) if m]
        assert unp.seqlens.tolist() == counts and unp.cu_seqlens.tolist() == [sum(counts[:i]) for i in
                                                                           range(batch + 1)]
        assert unp.max_seqlen == max(counts) and (unp.batch, unp.seqlen, unp.total) == (batch, seqlen, sum(counts))
        # each row's first packed row, kept inside [0, total) for empty rows (also when every row is empty)
        assert unp.first_token.tolist() == [min(sum(counts[:i]), max(sum(counts) - 1, 0)) for i in range(batch)]


@pytest.mark.parametrize("batch,seqlen", [(1, 9), (3, 17), (6, 4), (2, 0), (0, 5)])
def test_full_batch_fields(batch, seqlen):
    """full_batch (no mask: no host read) gives the fields unpad_mask gives for an all-ones mask, max_seqlen the
    padded length (the attention's tiling reads it: a smaller value leaves tokens uncomputed on the GPU), and
    first_token row b * seqlen."""
    unp = bertfast.padding.full_batch(batch, seqlen, torch.device("cpu"))
    ref = unpad_mask(torch.ones(batch, seqlen, dtype=torch.long))
    assert torch.equal(unp.indices, ref.indices) and unp.indices.dtype == torch.int64
    assert torch.equal(unp.seqlens, ref.seqlens) and unp.seqlens.dtype == torch.int32
    assert torch.equal(unp.cu_seqlens, ref.cu_seqlens) and unp.cu_seqlens.dtype == torch.int32
    assert (unp.max_seqlen, unp.batch, unp.seqlen, unp.total) == (seqlen, batch, seqlen, batch * seqlen)
    if batch * seqlen:
        assert unp.first_token.tolist() == [b * seqlen for b in range(batch)]


def _eager_and_graphed(family, max_graphs=16):
    """A model and its copy with graphs enabled, the copy's forward taking the graph path on this CPU (eligible
    as on CUDA, the graph's function run uncaptured)."""
    torch.manual_seed(FAMILIES.index(family) + 11)
    cfg = family_config(family, dropout=False)
    hf = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = bertfast.AutoModel.from_hf(hf).eval()
    graphed = copy.deepcopy(ours).enable_cuda_graphs(max_graphs=max_graphs)
    graphed._graph_capture = False
    graphed._graph_eligible = lambda device, embeds, total, batch, unpadded, extra: (
        embeds is None and total > 0 and not extra and not torch.is_grad_enabled()
        and not graphed._graph_unsafe_modules())
    return cfg, ours, graphed


def _right(lengths, seqlen):
    return (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()


def _inputs(cfg, model, mask, batch, seqlen, g):
    ids = torch.randint(3, cfg.vocab_size, (batch, seqlen), generator=g)
    if mask is not None:
        ids[mask == 0] = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    types = max(getattr(cfg, "type_vocab_size", 1), 1)
    tt = torch.randint(0, types, (batch, seqlen), generator=g) if model.has_token_types else None
    return ids, tt


def _assert_close_to_eager(out, eager, mask):
    """The two runs differ only in the GEMMs' row counts (the packed length), which may change the CPU GEMM's
    summation order: a few ulp of the largest value. Padding rows exactly zero in both."""
    ref = eager.last_hidden_state
    bound = 64 * torch.finfo(torch.float32).eps * ref.abs().max()
    real = torch.ones(ref.shape[:2], dtype=torch.bool) if mask is None else mask.bool()
    assert out.last_hidden_state.shape == ref.shape
    assert (out.last_hidden_state[real] - ref[real]).abs().max() <= bound
    assert not out.last_hidden_state[~real].any() and not ref[~real].any()
    if getattr(eager, "pooler_output", None) is not None:
        assert (out.pooler_output - eager.pooler_output).abs().max() <= bound
    else:
        assert getattr(out, "pooler_output", None) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_path_matches_eager(family):
    """Through forward (its range checks count the real tokens): batches of B sequences whose real-token counts
    round to one packed length share one graph whatever their padded length (stale buffers from the previous batch,
    longer or shorter, must not leak); a different count opens another; unpadded batches get one per shape."""
    cfg, ours, graphed = _eager_and_graphed(family)
    batch = 4
    g = torch.Generator().manual_seed(7)
    cases = [(23, _right([23, 20, 10, 7], 23)),            # 60 real tokens -> packed 64
             (23, _right([23, 1, 20, 6], 23).flip(1)),     # 50 -> 64, left padding, the same graph
             (31, _right([31, 9, 1, 12], 31)),             # 53 -> 64, padded longer: the same graph
             (12, _right([5, 0, 12, 2], 12)),              # 19 -> 32, a row with no real token
             (23, None)]                                   # unpadded: 92 -> 92, its own graph
    for seqlen, mask in cases:
        ids, tt = _inputs(cfg, ours, mask, batch, seqlen, g)
        with torch.inference_mode():
            eager = ours(ids, attention_mask=mask, token_type_ids=tt)
            out = graphed(ids, attention_mask=mask, token_type_ids=tt)
        _assert_close_to_eager(out, eager, mask)
    width = ours.max_sequence_length()
    assert sorted(k[:4] for k in graphed._graphs) == [(batch, 23, 92, False), (batch, width, 32, True),
                                                      (batch, width, 64, True)]


def test_graph_path_buffers_rewritten_every_call():
    """Whatever a graph's input buffers hold from before (random valid ids, positions, token types and mask
    here), a replay's outputs depend only on its own inputs; and a graph made under inference_mode serves a
    no_grad call (its buffers are not inference tensors)."""
    cfg, ours, graphed = _eager_and_graphed("bert")
    batch, seqlen = 3, 30
    g = torch.Generator().manual_seed(3)
    mask = _right([30, 11, 4], seqlen)
    ids, tt = _inputs(cfg, ours, mask, batch, seqlen, g)
    with torch.inference_mode():
        graphed(ids, attention_mask=mask, token_type_ids=tt)
    (entry,) = graphed._graphs.values()
    static = entry[1]
    width = static["input_ids"].shape[1]
    assert width == ours.max_sequence_length() and token_bucket(45, batch, width) == 48
    with torch.no_grad():
        static["input_ids"].copy_(torch.randint(0, cfg.vocab_size, (batch, width), generator=g))
        static["position_ids"].copy_(torch.randint(0, cfg.max_position_embeddings, (batch, width), generator=g))
        static["token_type_ids"].copy_(torch.randint(0, cfg.type_vocab_size, (batch, width), generator=g))
        static["real"].copy_(torch.rand(batch, width, generator=g) < 0.5)
        ids2, tt2 = _inputs(cfg, ours, mask, batch, seqlen, g)
        out = graphed(ids2, attention_mask=mask, token_type_ids=tt2)
        eager = ours(ids2, attention_mask=mask, token_type_ids=tt2)
    assert len(graphed._graphs) == 1
    _assert_close_to_eager(out, eager, mask)


def test_graph_cache_keeps_the_most_recently_used():
    cfg, ours, graphed = _eager_and_graphed("bert", max_graphs=2)
    g = torch.Generator().manual_seed(5)
    batch, seqlen = 2, 40
    masks = {"a": _right([40, 40], seqlen), "b": _right([40, 1], seqlen), "c": _right([3, 1], seqlen)}  # 80, 41, 4
    for name in "abac":
        ids, tt = _inputs(cfg, ours, masks[name], batch, seqlen, g)
        with torch.inference_mode():
            graphed(ids, attention_mask=masks[name], token_type_ids=tt)
    width = ours.max_sequence_length()
    packed = {name: token_bucket(int(m.sum()), batch, width) for name, m in masks.items()}
    assert len(set(packed.values())) == 3
    assert [k[2] for k in graphed._graphs] == [packed["a"], packed["c"]]     # b, the least recently used, dropped


def test_enable_cuda_graphs_arguments_and_cpu():
    cfg, ours, _ = _eager_and_graphed("bert")
    with pytest.raises(ValueError, match="max_graphs must be an int >= 1"):
        ours.enable_cuda_graphs(max_graphs=0)
    plain = copy.deepcopy(ours).enable_cuda_graphs()
    ids, tt = _inputs(cfg, ours, None, 2, 9, torch.Generator().manual_seed(1))
    bertfast.ops._notices.clear()
    with torch.inference_mode():
        plain(ids, attention_mask=_right([9, 4], 9))
    assert len(plain._graphs) == 0          # on the CPU forwards run eagerly, and that is said
    assert "forwards run eagerly" in bertfast.ops.notices()["graphs:cpu"]


def test_graphs_dropped_when_weights_move():
    """Graphs read the storage of the weights they were captured with: .to() / casting and load_state_dict
    drop them (captured again on use); in-place weight edits keep them."""
    cfg, ours, graphed = _eager_and_graphed("bert")
    ids, tt = _inputs(cfg, ours, None, 2, 9, torch.Generator().manual_seed(2))
    mask = _right([9, 4], 9)

    def call():
        with torch.inference_mode():
            return graphed(ids, attention_mask=mask, token_type_ids=tt)
    call()
    with torch.no_grad():
        graphed.pooler.dense.bias.add_(1.0)                   # in place: the graph stays
    assert len(graphed._graphs) == 1
    graphed.load_state_dict(ours.state_dict())
    assert len(graphed._graphs) == 0
    call()
    graphed.to(torch.float32)
    assert len(graphed._graphs) == 0
    with torch.inference_mode():
        eager = ours(ids, attention_mask=mask, token_type_ids=tt)
    _assert_close_to_eager(call(), eager, mask)
    assert len(graphed._graphs) == 1


def test_models_with_graphs_pickle():
    """Captured graphs do not travel: a pickled (or deep-copied) model starts with none and captures its own."""
    import pickle
    cfg, ours, graphed = _eager_and_graphed("bert")
    del graphed._graph_eligible                           # the instance's stand-in, not the model's state
    ids, tt = _inputs(cfg, ours, None, 2, 9, torch.Generator().manual_seed(4))
    with torch.inference_mode():
        graphed._graph_forward(ids, _right([9, 4], 9), tt, graphed.default_position_ids(ids, (2, 9), "cpu"), 13,
                               capture=False)
    assert len(graphed._graphs) == 1
    again = pickle.loads(pickle.dumps(graphed))
    assert again._graphs is not None and len(again._graphs) == 0 and len(graphed._graphs) == 1


class _Adapter(torch.nn.Module):
    """A stand-in for a LoRA-adapted linear layer (not an nn.Linear): the base layer plus a low-rank update."""

    def __init__(self, base):
        super().__init__()
        self.base_layer = base
        self.down = torch.nn.Linear(base.in_features, 2, bias=False)
        self.up = torch.nn.Linear(2, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.up(self.down(x))


def test_graphs_with_hooks_adapters_and_autocast():
    """A replay runs no Python: with hooks on the encoder's modules forwards run eagerly (the hooks run every
    time); a module swapped in after a capture (an adapter) drops the graphs, which are captured again with it;
    a graph captured under autocast serves only calls under the same autocast."""
    cfg, ours, graphed = _eager_and_graphed("bert")
    g = torch.Generator().manual_seed(5)
    mask = _right([9, 4, 7], 9)
    ids, tt = _inputs(cfg, ours, mask, 3, 9, g)
    with torch.inference_mode():
        graphed(ids, attention_mask=mask, token_type_ids=tt)
    assert len(graphed._graphs) == 1
    calls, replays = [], []
    graph_forward = graphed._graph_forward
    graphed._graph_forward = lambda *a, **k: replays.append(1) or graph_forward(*a, **k)
    handle = graphed.encoder.layer[1].output.dense.register_forward_hook(lambda m, a, o: calls.append(1))
    with torch.inference_mode():
        for _ in range(2):
            graphed(ids, attention_mask=mask, token_type_ids=tt)
    assert calls == [1, 1] and replays == []              # eager: the hook ran both times, no graph was replayed
    handle.remove()
    with torch.inference_mode():
        graphed(ids, attention_mask=mask, token_type_ids=tt)
    assert replays == [1]
    del graphed._graph_forward
    for model in (ours, graphed):
        torch.manual_seed(3)
        layer = model.encoder.layer[0].intermediate
        layer.dense = _Adapter(layer.dense)
    assert not torch.equal(graphed.encoder.layer[0].intermediate.dense.up.weight, torch.zeros(1))
    with torch.inference_mode():
        out = graphed(ids, attention_mask=mask, token_type_ids=tt)
        eager = ours(ids, attention_mask=mask, token_type_ids=tt)
    _assert_close_to_eager(out, eager, mask)
    assert len(graphed._graphs) == 1 and next(iter(graphed._graphs))[5] is None     # captured again
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = graphed(ids, attention_mask=mask, token_type_ids=tt)
        eager = ours(ids, attention_mask=mask, token_type_ids=tt)
    assert [k[5] for k in graphed._graphs] == [None, torch.bfloat16]
    q = mask.bool()
    assert (out.last_hidden_state[q].float() - eager.last_hidden_state[q].float()).abs().max() <= 0.05
