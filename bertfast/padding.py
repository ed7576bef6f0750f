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
        return self.cu_seqlens[:-1].long().clamp(max=max(self.total - 1, 0))


def unpad_mask(attention_mask: torch.Tensor, max_seqlen: int | None = None) -> Unpadded:
    """Index data for the real tokens of ``attention_mask`` ([B, S], nonzero = real token).

    Any mask pattern is allowed (right padding, left padding, holes): a sequence is its real tokens in order.
    ``max_seqlen`` may be given to avoid the one host read this function otherwise makes.
    """
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
    cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
    return Unpadded(indices, cu_seqlens, seqlens, seqlen, batch, seqlen)
