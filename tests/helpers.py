"""Shared test helpers: random transformers BERT models saved and reloaded, random padded batches."""
from __future__ import annotations

import copy

import torch
from transformers import BertConfig
from transformers import BertModel as HFBertModel

# where the Triton kernels run: the GPU when there is one, else the CPU through the interpreter (conftest sets it);
# reference masks drawn by the kernels come from there (the Philox draw does not depend on the device)
KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def bert_config(hidden=96, heads=3, layers=2, intermediate=None, vocab=211, max_pos=80, type_vocab=3, **kw):
    return BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                      intermediate_size=intermediate or 4 * hidden, vocab_size=vocab,
                      max_position_embeddings=max_pos, type_vocab_size=type_vocab, **kw)


def hf_bert(config, attn_implementation="eager"):
    """A transformers BertModel with random weights (its own initialisation), in eval mode."""
    model = HFBertModel._from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    return model.eval()


def hf_copy(model, attn_implementation):
    other = hf_bert(model.config, attn_implementation)
    other.load_state_dict(model.state_dict())
    return other


def random_batch(batch, seqlen, vocab, type_vocab=2, lengths=None, generator=None):
    """ids, mask, token types for a right-padded batch; lengths random in [1, seqlen] unless given, and always
    including one length-1 and one full-length sequence when batch >= 2."""
    if lengths is None:
        lengths = torch.randint(1, seqlen + 1, (batch,), generator=generator)
        if batch >= 2:
            lengths[0], lengths[1] = 1, seqlen
    lengths = torch.as_tensor(lengths)
    ids = torch.randint(0, vocab, (batch, seqlen), generator=generator)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    types = torch.randint(0, type_vocab, (batch, seqlen), generator=generator)
    return ids, mask, types


def real(mask):
    return mask.bool()


GUARD = 2048      # elements of sentinel on either side of a guarded allocation (more than a row of the tests)
SENTINEL = 7.0    # exact in every dtype the kernels write (fp32 / fp16 / bf16 / uint8)


def guard_allocations(monkeypatch):
    """From now on (until monkeypatch.undo()) torch.empty / torch.empty_like return views into larger buffers with
    GUARD SENTINEL elements on either side, so that a kernel writing outside a tensor it was given is seen (the
    Triton interpreter, like the GPU, does not check bounds). Returns the list of (buffer, numel) that
    assert_guards_intact checks."""
    real_empty, bases = torch.empty, []

    def empty(*size, dtype=None, device=None, **kw):
        shape = torch.Size(size[0] if len(size) == 1 and not isinstance(size[0], int) else size)
        base = real_empty(shape.numel() + 2 * GUARD, dtype=dtype, device=device, **kw).fill_(SENTINEL)
        bases.append((base, shape.numel()))
        return base[GUARD:GUARD + shape.numel()].view(shape)

    def empty_like(t, dtype=None, device=None, **kw):
        return empty(t.shape, dtype=t.dtype if dtype is None else dtype, device=t.device if device is None else device)

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    return bases


def assert_guards_intact(bases):
    assert bases, "nothing was allocated through the guards"
    for base, numel in bases:
        for where, guard in (("before", base[:GUARD]), ("after", base[GUARD + numel:])):
            assert (guard == SENTINEL).all(), f"a kernel wrote {where} a buffer of {numel} {base.dtype} elements"
