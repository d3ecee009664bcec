"""Gradient averaging across a ``torch.distributed`` group, sparse embedding rows included.

``GradientSync`` replaces DistributedDataParallel on CPU (gloo) for the embedding models: after
each backward it averages the dense gradients in one flat all-reduce and gathers the rows each
rank's sparse tables touched (one small all-reduce of row counts, then one all-gather of every
table's rows, indices and values packed in one float32 buffer). DDP's own sparse path on gloo
crashed two-worker runs with heap corruption; gathering the touched rows explicitly costs what
the batch touched, as the sparse path should, and keeps every collective a dense tensor.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def sparse_parameters(module: torch.nn.Module) -> set[int]:
    """Ids of the parameters that get sparse gradients (``sparse=True`` embedding tables)."""
    ids = set()
    for m in module.modules():
        if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) and m.sparse:
            ids.add(id(m.weight))
    return ids


class GradientSync:
    """Averages a module's gradients over the default process group; call after backward.

    Every rank must hold the same module. The constructor broadcasts rank 0's weights (as DDP
    does), so a group starts equal even if initialisations differ. A parameter whose gradient
    is None on a rank counts as zero there, so ranks whose batches skip a table stay in step.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.world = dist.get_world_size()
        sparse_ids = sparse_parameters(module)
        params = [p for p in module.parameters() if p.requires_grad]
        self.dense = [p for p in params if id(p) not in sparse_ids]
        self.sparse = [p for p in params if id(p) in sparse_ids]
        if any(p.dtype != torch.float32 for p in self.sparse):
            raise TypeError("GradientSync packs sparse rows as float32: keep tables in float32")
        with torch.no_grad():
            for p in params:
                dist.broadcast(p.data, src=0)
            for b in module.buffers():
                dist.broadcast(b, src=0)

    def __call__(self) -> None:
        """Replace every gradient by its mean over the group (sparse ones stay sparse)."""
        if self.world == 1:
            return
        self._dense()
        if self.sparse:
            self._sparse()

    def _dense(self) -> None:
        if not self.dense:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for p in self.dense:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n

    def _sparse(self) -> None:
        rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        for p in self.sparse:
            g = p.grad
            if g is None:
                rows.append((torch.empty(0, dtype=torch.int64), p.new_empty((0, *p.shape[1:]))))
                continue
            g = g.coalesce()
            rows.append((g.indices()[0], g.values()))
        rank = dist.get_rank()
        # Row counts through an all-reduce of one slot per rank: gloo's small all-gather is
        # several times slower.
        per_rank = torch.zeros((self.world, len(rows)), dtype=torch.int64)
        per_rank[rank] = torch.tensor([len(ix) for ix, _ in rows], dtype=torch.int64)
        dist.all_reduce(per_rank)
        caps = per_rank.max(0).values.tolist()
        widths = [math.prod(p.shape[1:]) + 2 for p in self.sparse]
        # Every table's rows in one buffer, one all-gather: an int64 index is two float32 words.
        packed = torch.zeros(sum(c * w for c, w in zip(caps, widths, strict=True)))
        offset = 0
        for (ix, vals), cap, width in zip(rows, caps, widths, strict=True):
            block = packed[offset : offset + cap * width].view(cap, width)
            block[: len(ix), :2] = ix.contiguous().view(torch.float32).view(-1, 2)
            block[: len(ix), 2:] = vals.reshape(len(ix), width - 2)
            offset += cap * width
        gathered = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(gathered, packed)
        offset = 0
        for t, (p, cap, width) in enumerate(zip(self.sparse, caps, widths, strict=True)):
            parts = [
                g[offset : offset + cap * width].view(cap, width)[: int(per_rank[r, t])]
                for r, g in enumerate(gathered)
            ]
            offset += cap * width
            both = torch.cat(parts)
            indices = both[:, :2].contiguous().view(torch.int64).view(-1)
            values = both[:, 2:].reshape(len(indices), *p.shape[1:]).div_(self.world)
            p.grad = torch.sparse_coo_tensor(
                indices[None], values, p.shape, check_invariants=False
            ).coalesce()
