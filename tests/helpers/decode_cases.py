"""Random NSA decode caches, shared by the Triton decode tests and the GPU-compile check of the kernels."""
from __future__ import annotations

import torch

from nsa_dist.inference import DecodeKV
from nsa_dist.inference.positions import ring_positions, step_positions


def random_cache(lengths, S, H, G, Dk, Dv, geometry, shared, capacity, dtype=torch.float32, device=None):
    """q, positions (``lengths[b] + s``), a random ``DecodeKV`` of ``capacity`` rows as ``NSALayerCache.append``
    lays it out (shared K/V: the window is the selection buffers; separate: a ring of ``w`` then the step's
    tokens), and gates; on the default device unless ``device`` is given."""
    B = len(lengths)
    held = torch.tensor(lengths, device=device)
    positions = step_positions(held, S)
    n_cmp = (capacity - geometry.block_len) // geometry.stride + 1

    def rand(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    k_slc, v_slc = rand(B, capacity, H, Dk), rand(B, capacity, H, Dv)
    window = (None, None, None)
    if geometry.window and shared:
        window = (k_slc, v_slc, torch.arange(capacity, device=device).expand(B, capacity))
    elif geometry.window:
        window = (rand(B, geometry.window + S, H, Dk), rand(B, geometry.window + S, H, Dv),
                  torch.cat([ring_positions(held, geometry.window), positions], 1))
    kv = DecodeKV(rand(B, n_cmp, H, Dk), rand(B, n_cmp, H, Dv), k_slc, v_slc, *window, None, None)
    return rand(B, S, G * H, Dk), positions, kv, torch.rand(B, S, G * H, 3, device=device).to(dtype)
