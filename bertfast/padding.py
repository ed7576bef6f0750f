"""Unpadding: from a padded batch [B, S] and its attention mask to the packed real tokens [T], and back.

The encoder unpads once before the embeddings and pads once after the last layer; every layer in between runs
on the T real tokens only. Tokens of one sequence stay in order and contiguous in the packed layout, so a
sequence b owns the packed rows cu_seqlens[b] : cu_seqlens[b + 1].
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Unpadded:
    """The index data of one unpadded batch.

    indices:    (T,) int64 - flat positions (b * S + s) of the real tokens in the padded [B, S] batch
    cu_seqlens: (B + 1,) int32 - cumulative sequence lengths, starting at 0 and ending at T
    seqlens:    (B,) int32 - real tokens per sequence (0 for a row whose mask is all zeros)
    max_seqlen: python int - the longest sequence (0 when every row is empty)
    batch, seqlen: the padded shape B, S

    (unpad_mask_fixed adds filler tokens: then T counts them too and cu_seqlens has one more entry, see there.)
    """
    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seqlen: int

    @property
    def total(self) -> int:
        return self.indices.shape[0]

    @property
    def first_token(self) -> torch.Tensor:
        """(B,) int64 packed row of each sequence's first real token (the [CLS] row); clamped for empty rows,
        which callers mask with ``seqlens > 0``."""
        return self.cu_seqlens[:self.batch].long().clamp(max=max(self.total - 1, 0))


def unpad_mask(attention_mask: torch.Tensor, max_seqlen: int | None = None) -> Unpadded:
    """Index data for the real tokens of ``attention_mask`` ([B, S], nonzero = real token).

    Any mask pattern is allowed (right padding, left padding, holes): a sequence is its real tokens in order.
    ``max_seqlen`` may be given to avoid the one host read this function otherwise makes.
    """
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be a [batch, seq_len] tensor, got "
                         f"{tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__}")
    batch, seqlen = attention_mask.shape
    real = attention_mask != 0
    seqlens = real.sum(dim=1, dtype=torch.int32)
    indices = torch.nonzero(real.flatten(), as_tuple=False).flatten()
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    if max_seqlen is None:
        max_seqlen = int(seqlens.max().item()) if batch > 0 else 0
    return Unpadded(indices, cu_seqlens, seqlens, max_seqlen, batch, seqlen)


def full_batch(batch: int, seqlen: int, device) -> Unpadded:
    """Index data for a batch with no padding (no attention mask given): no host read needed."""
    indices = torch.arange(batch * seqlen, device=device)
    seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    cu_seqlens = torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen     # also for seqlen 0
    return Unpadded(indices, cu_seqlens, seqlens, seqlen, batch, seqlen)


def graph_width(seqlen: int, max_positions: int) -> int:
    """The padded length of a CUDA graph's input buffers for a batch padded to ``seqlen``: the model's positions,
    so that batches padded to any length share graphs; for models with more than 512 positions at most the next
    power of two >= seqlen (and >= 512), which bounds a graph's buffers to ~2x the batch. Never below seqlen."""
    cap = 512
    while cap < seqlen:
        cap *= 2
    return max(seqlen, min(max_positions, cap))


def token_bucket(total: int, batch: int, seqlen: int) -> int:
    """The packed length a captured CUDA graph serves ``total`` real tokens of a [batch, seqlen] batch with: total
    rounded up to a multiple of q, the power of two >= total / 8 (at least 16, at most seqlen), and at most
    batch * seqlen. So the filler tokens (bucket - total) are fewer than seqlen and fewer than max(16, total / 4)
    (~5-10% of the bucket on average), and a doubling of total spans 4-8 buckets while 8 * seqlen >= total, one
    bucket per seqlen tokens above that."""
    q = 16
    while q < seqlen and 8 * q < total:
        q *= 2
    q = min(q, seqlen)
    return min(-(-total // q) * q, batch * seqlen)


def unpad_mask_fixed(attention_mask: torch.Tensor, total: int) -> Unpadded:
    """unpad_mask for a packed length fixed in advance, with no host read (what a CUDA graph captures).

    ``total`` must be at least the number of real tokens T and at most T + S - 1 and B * S (token_bucket's
    values). The packed rows are the T real tokens in unpad_mask's order, then ``total - T`` filler tokens: the
    first padding positions of the batch, in order. cu_seqlens (B + 2 entries) makes the fillers one extra trailing
    sequence, so the attention's inputs stay consistent (it ends at ``total``) and no real token attends to a filler;
    seqlens, batch and first_token cover the B real sequences only. Padding the output scatters the filler rows
    onto their padding positions: callers clear those (they hold values computed from pad tokens).
    """
    batch, seqlen = attention_mask.shape
    real = (attention_mask != 0).reshape(-1)
    count = real.to(torch.int32)
    before = torch.cumsum(count, 0, dtype=torch.int32)         # real tokens up to and including each position
    n_real = before[-1:] if real.numel() else count.new_zeros(1)
    pads_before = torch.arange(1, real.numel() + 1, device=real.device, dtype=torch.int32) - before
    # each position's packed row: real tokens first, in order, then the padding positions in order
    dest = torch.where(real, before - 1, n_real + pads_before - 1).long()
    order = torch.empty_like(dest).scatter_(0, dest, torch.arange(real.numel(), device=real.device))
    seqlens = count.view(batch, seqlen).sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.cat([seqlens.new_zeros(1), torch.cumsum(seqlens, 0, dtype=torch.int32),
                            seqlens.new_full((1,), total)])
    return Unpadded(order[:total], cu_seqlens, seqlens, seqlen, batch, seqlen)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, max_seqlen: int, error: type = ValueError) -> None:
    """cu_seqlens' values against the packed length and max_seqlen: starts at 0, non-decreasing, ends at total,
    longest sequence <= max_seqlen. One host read; skipped while compiling or capturing a CUDA graph, where nothing
    may be read. Raises `error` (the kernels pass their UnsupportedInput) naming what is wrong."""
    if torch.compiler.is_compiling() or (cu_seqlens.device.type == "cuda"
                                         and torch.cuda.is_current_stream_capturing()):
        return
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]      # callers pass at least two offsets
    first, last, min_len, max_len = torch.stack(
        [cu_seqlens[0], cu_seqlens[-1], lengths.min(), lengths.max()]).tolist()
    if first != 0:
        raise error(f"cu_seqlens must start at 0, got {first}")
    if min_len < 0:
        raise error("cu_seqlens must be monotonic non-decreasing")
    if last != total:
        raise error(f"cu_seqlens must end at T = qkv.shape[0] = {total}, got {last}")
    if max_len > max_seqlen:
        raise error(f"max_seqlen {max_seqlen} is smaller than the longest sequence in cu_seqlens ({max_len})")
