"""The CUDA-graph forward's padding-free path (enable_cuda_graphs), without a GPU: the fixed-length unpadding it
captures (bertfast.padding.unpad_mask_fixed, token_bucket) against unpad_mask, and the graphed forward's
static-buffer function run uncaptured on CPU (EncoderModel._graph_forward(..., capture=False)) against the eager
forward, for every family, with buffers reused across batches of one bucket. The captured version runs in
test_gpu_model.py where CUDA is present."""
import copy

import pytest
import torch

import bertfast
from bertfast.padding import token_bucket, unpad_mask, unpad_mask_fixed
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


def _eager_and_graphed(family):
    torch.manual_seed(FAMILIES.index(family) + 11)
    cfg = family_config(family, dropout=False)
    hf = BASE[family]._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    ours = bertfast.AutoModel.from_hf(hf).eval()
    return cfg, ours, copy.deepcopy(ours).enable_cuda_graphs()


@pytest.mark.parametrize("family", FAMILIES)
def test_graph_path_matches_eager(family):
    """Batches of one [B, S] whose real-token counts share a packed length reuse one entry (stale buffers from the
    previous batch must not leak); a different count opens another; unpadded batches have their own entries."""
    cfg, ours, graphed = _eager_and_graphed(family)
    batch, seqlen = 4, 23
    vocab, types = cfg.vocab_size, max(getattr(cfg, "type_vocab_size", 1), 1)
    g = torch.Generator().manual_seed(7)
    right = lambda lengths: (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).long()  # noqa: E731
    masks = [right([23, 20, 10, 7]),          # 60 real tokens -> packed 64
             right([23, 1, 20, 6]).flip(1),   # 50 -> 64, left padding, reusing the entry above
             right([5, 0, 23, 2]),            # 30 -> 32, a row with no real token
             None]                            # unpadded: 92 -> 92
    for mask in masks:
        ids = torch.randint(3, vocab, (batch, seqlen), generator=g)
        if mask is not None:
            ids[mask == 0] = cfg.pad_token_id if cfg.pad_token_id is not None else 0
        tt = torch.randint(0, types, (batch, seqlen), generator=g) if ours.has_token_types else None
        with torch.inference_mode():
            eager = ours(ids, attention_mask=mask, token_type_ids=tt)
            _, _, tt_c, pos, _ = graphed._check_inputs(ids, mask, tt, None, None)
            total = batch * seqlen if mask is None else int(mask.sum())
            last, pooled = graphed._graph_forward(ids, mask, tt_c, pos, total, capture=False)
        ref = eager.last_hidden_state
        # the two runs differ only in the GEMMs' row counts (packed length), which may change the summation order
        # of the CPU GEMM: a few ulp of the largest value
        bound = 64 * torch.finfo(torch.float32).eps * ref.abs().max()
        real = torch.ones(batch, seqlen, dtype=torch.bool) if mask is None else mask.bool()
        assert (last[real] - ref[real]).abs().max() <= bound
        assert not last[~real].any() and not ref[~real].any()             # padding rows are exactly zero
        if getattr(eager, "pooler_output", None) is not None:
            assert (pooled - eager.pooler_output).abs().max() <= bound
        else:
            assert pooled is None
    keys = sorted(graphed._graphs)
    assert [k[:4] for k in keys] == [(batch, seqlen, 32, True), (batch, seqlen, 64, True),
                                     (batch, seqlen, 92, False)]


def test_graph_path_poisoned_buffers():
    """Whatever the graph's buffers held before (NaN here), a replay's outputs depend only on its inputs: the
    filler rows and the padding positions they are scattered onto are recomputed and cleared every time."""
    _, ours, graphed = _eager_and_graphed("bert")
    batch, seqlen = 3, 30
    ids = torch.randint(3, 100, (batch, seqlen))
    mask = (torch.arange(seqlen)[None, :] < torch.tensor([30, 11, 4])[:, None]).long()
    with torch.inference_mode():
        _, _, _, pos, _ = graphed._check_inputs(ids, mask, None, None, None)
        graphed._graph_forward(ids, mask, None, pos, 45, capture=False)
        (entry,) = graphed._graphs.values()
        for t in entry[2]:
            t.fill_(float("nan"))
        last, pooled = graphed._graph_forward(ids, mask, None, pos, 45, capture=False)
        eager = ours(ids, attention_mask=mask)
    assert token_bucket(45, batch, seqlen) == 48
    bound = 64 * torch.finfo(torch.float32).eps * eager.last_hidden_state.abs().max()
    assert (last - eager.last_hidden_state).abs().max() <= bound             # NaN would fail this
    assert (pooled - eager.pooler_output).abs().max() <= bound
