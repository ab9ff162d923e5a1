"""Long recordings in overlapping chunks, with bounded memory and the same source order in every chunk.

A separator's memory grows with the input's length (activations of ``time x channels`` per layer). A
recording longer than ``chunk`` samples is cut into chunks that overlap by ``overlap`` samples, hop
``h = chunk - overlap``; each chunk is separated on its own. A separator has no fixed source order, so
chunk ``k`` is permuted to agree best with chunk ``k - 1`` on their shared samples:

.. math::  \\pi_k = \\arg\\max_\\pi \\sum_s \\langle y_{k-1, s}, y_{k, \\pi(s)} \\rangle_{\\text{overlap}}

(the alignment of Asteroid's ``LambdaOverlapAdd(reorder_chunks=True)``), and the chunks are cross-faded
over the overlap with linear ramps that sum to one, so that a sample's estimate is a convex mix of the
two chunks that hold it. Memory is that of one chunk, whatever the recording's length.
"""
from __future__ import annotations

from itertools import permutations
from typing import Callable

import numpy as np


def separate_in_chunks(forward: Callable[[np.ndarray], np.ndarray], mixture: np.ndarray, chunk: int,
                       overlap: int, align: bool = True) -> np.ndarray:
    """``forward``: ``[batch, time] -> [batch, n_src, time]``; ``mixture``: ``[batch, time]``. Returns
    ``[batch, n_src, time]``, computed ``chunk`` samples at a time (one call when it fits in one chunk).
    Multichannel models: ``[batch, channels, time] -> [batch, n_src, channels, time]`` alike. ``align=False``
    keeps every chunk's source order (sources with names, such as music stems, have a fixed one)."""
    if not 0 <= overlap < chunk:
        raise ValueError(f"overlap must be in [0, chunk): chunk {chunk}, overlap {overlap}")
    length = mixture.shape[-1]
    if length <= chunk:
        return forward(mixture)
    hop = chunk - overlap
    starts = list(range(0, length - overlap, hop))
    if starts[-1] + chunk < length:
        starts.append(length - chunk)
    out, previous = None, None
    for k, start in enumerate(starts):
        piece = forward(mixture[..., start:start + chunk])
        if out is None:
            out = np.zeros(piece.shape[:-1] + (length,), dtype=piece.dtype)
        shared = (starts[k - 1] + chunk - start) if k else 0          # samples shared with the previous chunk
        if k and shared > 0:
            if align:
                piece = _aligned(previous[..., -shared:], piece, shared)
            ramp = np.linspace(0.0, 1.0, shared + 2, dtype=piece.dtype)[1:-1]
            out[..., start:start + shared] = out[..., start:start + shared] * (1 - ramp) + piece[..., :shared] * ramp
            out[..., start + shared:start + piece.shape[-1]] = piece[..., shared:]
        else:
            out[..., start:start + piece.shape[-1]] = piece
        previous = piece
    return out


def _aligned(before: np.ndarray, piece: np.ndarray, shared: int) -> np.ndarray:
    """``piece`` ``[batch, n_src, (channels,) time]`` with its sources permuted, per example, to best match
    ``before`` (``[batch, n_src, (channels,) shared]``) on their shared samples."""
    n_src = piece.shape[1]
    head = piece[..., :shared]
    aligned = np.empty_like(piece)
    for b in range(piece.shape[0]):
        score = before[b].reshape(n_src, -1) @ head[b].reshape(n_src, -1).T      # [n_src, n_src] inner products
        best = max(permutations(range(n_src)), key=lambda p: sum(score[s, p[s]] for s in range(n_src)))
        aligned[b] = piece[b, list(best)]
    return aligned
