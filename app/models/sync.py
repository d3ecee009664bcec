"""Gradient averaging across a ``torch.distributed`` group, sparse embedding rows included.

``GradientSync`` replaces DistributedDataParallel on CPU (gloo) for the embedding models: after
each backward it averages the dense gradients in one flat all-reduce and gathers the rows each
rank's sparse tables touched in one all-gather of a float32 buffer per rank (its row counts in
a header, then every table's indices and values, each table padded to a capacity the group
agrees on). The first step agrees on the capacities through an all-reduce of row counts; a
later step whose rows outgrow a capacity is seen by every rank in the headers and gathered
again with a larger one. A table whose gathered rows would come near its own size joins the
dense all-reduce instead, with a touched-row mask, and still leaves a sparse gradient over the
rows the group touched. DDP's own sparse path on gloo crashed two-worker runs with heap
corruption; gathering the touched rows explicitly costs what the batch touched, as the sparse
path should, and keeps every collective a dense tensor.
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

    def __init__(
        self, module: torch.nn.Module, dense_fraction: float = 0.5, headroom: float = 1.125
    ) -> None:
        self.world = dist.get_world_size()
        # A sparse table is summed densely once the group's gathered rows reach this share of it.
        self.dense_fraction = dense_fraction
        # Capacity per table = headroom x the most rows a rank last sent: padding costs bytes,
        # an overflow costs a second all-gather.
        self.headroom = headroom
        self.seen: list[int] | None = None  # the most rows any rank touched, per sparse table
        self.caps: list[int] = []
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
        rows = [self._rows(p) for p in self.sparse]
        if self.seen is None:
            self.seen = self._row_counts(rows).max(0).values.tolist()
            self.caps = [self._capacity(n) for n in self.seen]
        # An all-reduce moves the table once, an all-gather moves every rank's rows to every
        # rank: past a share of the table, the dense sum is the cheaper collective.
        dense_rows = [
            self.world * seen >= self.dense_fraction * len(p)
            for p, seen in zip(self.sparse, self.seen, strict=True)
        ]
        self._all_reduce(
            [r for r, d in zip(rows, dense_rows, strict=True) if d],
            [p for p, d in zip(self.sparse, dense_rows, strict=True) if d],
        )
        gathered = [t for t, d in enumerate(dense_rows) if not d]
        if gathered:
            self._all_gather(rows, gathered)

    def _capacity(self, rows: int) -> int:
        return max(1, math.ceil(rows * self.headroom))

    @staticmethod
    def _rows(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A sparse table's touched row indices and their gradient rows (none if no grad)."""
        if p.grad is None:
            return torch.empty(0, dtype=torch.int64), p.new_empty((0, *p.shape[1:]))
        g = p.grad.coalesce()
        return g.indices()[0], g.values()

    def _row_counts(self, rows: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``[rank, table]`` touched-row counts, through an all-reduce of one slot per rank.

        Gloo's small all-gather is several times slower.
        """
        per_rank = torch.zeros((self.world, len(rows)), dtype=torch.int64)
        if rows:
            per_rank[dist.get_rank()] = torch.tensor([len(ix) for ix, _ in rows])
            dist.all_reduce(per_rank)
        return per_rank

    def _all_reduce(
        self, rows: list[tuple[torch.Tensor, torch.Tensor]], tables: list[torch.Tensor]
    ) -> None:
        """One flat all-reduce of the dense gradients and of ``tables`` summed densely.

        Each table carries a touched-row mask so that its gradient stays sparse over the union
        of rows the group touched: the optimiser then steps the same rows as after a gather.
        """
        if not self.dense and not tables:
            return
        parts = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.dense]
        flat_parts = [g.reshape(-1) for g in parts]
        for (ix, vals), p in zip(rows, tables, strict=True):
            table = p.new_zeros((len(p), math.prod(p.shape[1:]) + 1))
            table[ix, :-1] = vals.reshape(len(ix), -1)
            table[ix, -1] = 1.0
            flat_parts.append(table.view(-1))
        flat = torch.cat(flat_parts) if len(flat_parts) > 1 else flat_parts[0]
        dist.all_reduce(flat)
        flat.div_(self.world)
        offset = 0
        for p in self.dense:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p)
            offset += n
        for p in tables:
            width = math.prod(p.shape[1:]) + 1
            table = flat[offset : offset + len(p) * width].view(len(p), width)
            offset += len(p) * width
            ix = table[:, -1].nonzero().view(-1)
            values = table[ix, :-1].reshape(len(ix), *p.shape[1:])
            p.grad = torch.sparse_coo_tensor(
                ix[None], values, p.shape, check_invariants=False, is_coalesced=True
            )

    def _all_gather(self, rows: list[tuple[torch.Tensor, torch.Tensor]], tables: list[int]) -> None:
        """Every rank's rows of the ``tables`` (positions in ``self.sparse``) in one all-gather.

        One buffer holds them all: a header of row counts, then each table's rows up to its
        capacity; an int64 (count or index) is two float32 words. Every rank reads the same
        headers, so all of them see an overflow and gather again with the grown capacities.
        """
        assert self.seen is not None
        head = 2 * len(tables)
        widths = {t: math.prod(self.sparse[t].shape[1:]) + 2 for t in tables}
        caps = {t: self.caps[t] for t in tables}
        packed = torch.zeros(head + sum(caps[t] * widths[t] for t in tables))
        packed[:head].view(torch.int64).copy_(torch.tensor([len(rows[t][0]) for t in tables]))
        offset = head
        for t in tables:
            (ix, vals), cap, width = rows[t], caps[t], widths[t]
            n = min(len(ix), cap)
            block = packed[offset : offset + cap * width].view(cap, width)
            block[:n, :2] = ix[:n].contiguous().view(torch.float32).view(-1, 2)
            block[:n, 2:] = vals[:n].reshape(n, width - 2)
            offset += cap * width
        gathered = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(gathered, packed)
        counts = torch.stack([g[:head].view(torch.int64) for g in gathered])  # [rank, table]
        most = counts.max(0).values.tolist()
        for t, n in zip(tables, most, strict=True):
            self.seen[t] = n
        if any(n > caps[t] for t, n in zip(tables, most, strict=True)):
            for t, n in zip(tables, most, strict=True):
                self.caps[t] = max(self.caps[t], self._capacity(n))
            self._all_gather(rows, tables)
            return
        offset = head
        for j, t in enumerate(tables):
            p, cap, width = self.sparse[t], caps[t], widths[t]
            parts = [
                g[offset : offset + cap * width].view(cap, width)[: int(counts[r, j])]
                for r, g in enumerate(gathered)
            ]
            offset += cap * width
            both = torch.cat(parts)
            indices = both[:, :2].contiguous().view(torch.int64).view(-1)
            values = both[:, 2:].reshape(len(indices), *p.shape[1:]).div_(self.world)
            p.grad = torch.sparse_coo_tensor(
                indices[None], values, p.shape, check_invariants=False
            ).coalesce()
