"""The routing inverted: for each (batch row, key head, chunk), the list of query slots that selected it.

The Triton kernels (triton_sparse.py) are kv-centric: a program loads one chunk's keys and values and runs the
queries that chose it through `tl.dot` in tiles. Token-major selections (B, H, N, k) are turned into such lists
on the device, without host synchronisation:

  entry  e = ((b * H + h) * N + t) * k + slot, one per valid selection (the flat index into `selected`,
         so a kernel finds the query row e // k and writes the slot's partial result at e);
  list   l = (b * H_kv + h // G) * n_chunks + chunk; entries[offsets[l]:offsets[l + 1]] are its entries,
         in increasing e (a stable sort), so the lists and their tiles are the same from run to run.

The query heads of a key-head group share one list, so a chunk's key/value gradients are summed over the group
inside one program (no atomics).
"""

from typing import Tuple

import torch


def selection_csr(selected: torch.Tensor, n_kv_heads: int, n_chunks: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """selected (B, H, N, k) chunk ids (-1 = none) -> (entries (B * H * N * k,) int32, offsets (n_lists + 1,)
    int32), n_lists = B * n_kv_heads * n_chunks. Invalid selections sort after every list (past offsets[-1])."""
    B, H, N, k = selected.shape
    n_lists = B * n_kv_heads * n_chunks
    device = selected.device
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    kv_head = (torch.arange(H, device=device) // (H // n_kv_heads)).view(1, H, 1, 1)
    key = torch.where(selected >= 0, (b * n_kv_heads + kv_head) * n_chunks + selected, n_lists).flatten()
    # the narrowest key type a radix sort takes fewer passes over (list ids and the sentinel n_lists fit int16 up
    # to 32,767 lists: 64k tokens, 12 key heads, C 64 make 12,288)
    key = key.to(torch.int16 if n_lists < 2**15 else torch.int32)
    sorted_key, entries = torch.sort(key, stable=True)
    boundaries = torch.arange(n_lists + 1, dtype=key.dtype, device=device)
    offsets = torch.searchsorted(sorted_key, boundaries)
    return entries.to(torch.int32), offsets.to(torch.int32)


def tile_work_list(offsets: torch.Tensor, n_entries: int, tile: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The lists cut into tiles of up to `tile` entries: (list id, first entry) per tile, int32.

    The grid has a size known on the host, cdiv(n_entries, tile) + n_lists >= the number of tiles (each list
    wastes less than one tile); slots past the last tile get list id -1 and their programs exit at once."""
    n_lists = offsets.numel() - 1
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts + tile - 1) // tile
    tiles_end = torch.cumsum(tiles, 0, dtype=torch.int32)
    n_slots = -(-n_entries // tile) + n_lists
    slot = torch.arange(n_slots, dtype=torch.int32, device=offsets.device)
    owner = torch.searchsorted(tiles_end, slot, right=True)  # the list whose tiles cover this slot
    in_range = owner < n_lists
    owner = owner.clamp(max=n_lists - 1)
    first_tile = tiles_end[owner] - tiles[owner]
    start = offsets[owner] + (slot - first_tile) * tile
    return torch.where(in_range, owner, -1).to(torch.int32), start.to(torch.int32)


class ListSegments:
    """The lists cut into segments of up to `segment` entries, the unit of one dK/dV program in the backward, so
    that a chunk which very many query slots chose is not one long serial loop.

    Per segment slot (the grid of `tile_work_list`): list id (-1: unused), first entry, and where its partial
    dK/dV goes: -1 when the list has one segment (straight into the list's rows), else a row block of a
    buffer that a second pass sums per list in segment order (deterministic). Per list: its number of segments
    and the buffer index of its first one. Multi-segment lists hold more than `segment` entries each, so the
    buffer needs fewer than 2 * n_entries / segment row blocks."""

    def __init__(self, offsets: torch.Tensor, n_entries: int, segment: int):
        n_lists = offsets.numel() - 1
        self.slot_list, self.slot_start = tile_work_list(offsets, n_entries, segment)
        counts = offsets[1:] - offsets[:-1]
        self.list_segments = ((counts + segment - 1) // segment).to(torch.int32)
        split = torch.cat([self.list_segments > 1, torch.zeros(1, dtype=torch.bool, device=offsets.device)])
        in_buffer = split[torch.where(self.slot_list >= 0, self.slot_list, n_lists).long()]
        self.slot_buffer = torch.where(in_buffer, torch.cumsum(in_buffer, 0) - 1, -1).to(torch.int32)
        first_slot = (torch.cumsum(self.list_segments, 0) - self.list_segments).long()
        first_buffer = self.slot_buffer[first_slot.clamp(max=self.slot_buffer.numel() - 1)]
        self.list_first_buffer = torch.where(self.list_segments > 1, first_buffer, -1).to(torch.int32)
        self.buffer_blocks = 2 * -(-n_entries // segment)
