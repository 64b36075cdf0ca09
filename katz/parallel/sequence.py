"""Latent parallelism for a transformer (FLUX.1): one step's image tokens split over shards.

FLUX runs one transformer evaluation a step (no CFG halves to share out), so the step itself is
split: the packed image tokens are cut into bands of whole patch rows, one band per shard, and
every shard runs the whole transformer on its band. Everything in a block but attention works
token by token (modulation, norms, MLPs, the output head; a ControlNet residual is added to the
token it belongs to), so a band's tokens need nothing from other bands there. Attention needs
every token's key and value: each shard projects its own tokens (rotary embedding applied with
their own positions), the shards exchange the image keys and values (an all-gather, the
"all-KV" form of ring attention), and each attends with its own queries over all of them, in the
unsharded order. The text tokens (512 for FLUX.1-dev) are small next to the image's (4096 at
1024 px) and are kept whole on every shard: each computes the same text stream, so the shards
agree on it without exchanging it.

The result is the unsharded evaluation up to floating-point order (attention over the same keys,
in the same order, with fewer queries per call). Shards here are threads of one process
(:class:`ThreadGroup`); a transport between GPUs (NCCL all-gather) is not built.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch


class ThreadGroup:
    """Shards as threads of one process: :meth:`all_gather` hands every shard the list of all
    shards' tensors (a barrier before and after, so a slot is not overwritten while it is read)."""

    def __init__(self, size: int):
        self.size = size
        self._slots: list[torch.Tensor | None] = [None] * size
        self._barrier = threading.Barrier(size)

    def all_gather(self, rank: int, tensor: torch.Tensor) -> list[torch.Tensor]:
        self._slots[rank] = tensor
        self._barrier.wait()
        out = list(self._slots)
        self._barrier.wait()
        return out

    def abort(self) -> None:
        """Release shards waiting in :meth:`all_gather` (a shard failed: the others fail too)."""
        self._barrier.abort()


@dataclass
class Shard:
    """One shard's place: its rank in ``group`` and the number of text tokens ahead of the image
    tokens in a single block's joint sequence."""

    rank: int
    group: ThreadGroup
    text_len: int


def token_bands(rows: int, cols: int, shards: int) -> list[tuple[int, int]]:
    """``(first, end)`` token of each shard's band: whole rows of a ``rows x cols`` token grid,
    as even as the rows allow (a shard may get none when there are more shards than rows)."""
    per, extra = divmod(rows, shards)
    bands, row = [], 0
    for i in range(shards):
        n = per + (i < extra)
        bands.append((row * cols, (row + n) * cols))
        row += n
    return bands


class SequenceShardAttention:
    """FLUX attention for a shard (set on every attention module of the transformer): the same
    projections, norms and rotary embedding as diffusers' ``FluxAttnProcessor``, with the image
    keys and values of all shards. Without ``shard`` (the unsharded call) it is that processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None, shard: Shard | None = None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        def heads(x):
            return x.unflatten(-1, (-1, attn.head_dim))

        query = attn.norm_q(heads(attn.to_q(hidden_states)))
        key = attn.norm_k(heads(attn.to_k(hidden_states)))
        value = heads(attn.to_v(hidden_states))
        joint = encoder_hidden_states is not None  # a double block: the text stream comes separately
        if joint:
            query = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(encoder_hidden_states))), query], dim=1)
            key = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(encoder_hidden_states))), key], dim=1)
            value = torch.cat([heads(attn.add_v_proj(encoder_hidden_states)), value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if shard is not None:
            text = encoder_hidden_states.shape[1] if joint else shard.text_len
            key = torch.cat([key[:, :text], *shard.group.all_gather(shard.rank, key[:, text:])], dim=1)
            value = torch.cat([value[:, :text], *shard.group.all_gather(shard.rank, value[:, text:])], dim=1)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask).flatten(2, 3).to(query.dtype)
        if not joint:
            return out
        text_out, image_out = out.split_with_sizes([encoder_hidden_states.shape[1],
                                                    out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


def install(transformer: torch.nn.Module) -> None:
    """Put :class:`SequenceShardAttention` on every attention module of a FLUX transformer."""
    transformer.set_attn_processor(SequenceShardAttention())


class SequenceParallel:
    """A FLUX transformer evaluation (:class:`katz.diffusion.flux.TransformerFn`) split over
    ``shards`` threads. ``transformer(..., attention_kwargs=...)`` is the engine's call on a band;
    its module must have :func:`install`'s processors."""

    def __init__(self, transformer, shards: int, rows: int, cols: int):
        if shards < 1:
            raise ValueError(f"shards must be >= 1, not {shards}")
        self.transformer, self.shards = transformer, shards
        self.bands = [b for b in token_bands(rows, cols, shards) if b[1] > b[0]]
        self.pool = ThreadPoolExecutor(max_workers=len(self.bands), thread_name_prefix="katz-sequence")

    def __call__(self, hidden_states, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids,
                 img_ids, block_residuals=None, single_block_residuals=None) -> torch.Tensor:
        group = ThreadGroup(len(self.bands))
        text_len = encoder_hidden_states.shape[1]

        def band(x: Sequence[torch.Tensor] | None, a: int, b: int):
            return None if x is None else [r[:, a:b] for r in x]

        def run(rank: int):
            a, b = self.bands[rank]
            try:
                return self.transformer(
                    hidden_states[:, a:b], timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids,
                    img_ids[a:b], band(block_residuals, a, b), band(single_block_residuals, a, b),
                    attention_kwargs={"shard": Shard(rank, group, text_len)},
                )
            except BaseException:
                group.abort()
                raise

        futures = [self.pool.submit(run, rank) for rank in range(len(self.bands))]
        return torch.cat([f.result() for f in futures], dim=1)

    def close(self) -> None:
        self.pool.shutdown(wait=True)
