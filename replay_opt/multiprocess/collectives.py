"""What the ranks compute together: gradients at ``optimizer.step()``, the global norm, metrics.

* ``reduce_gradients`` -- once per optimizer step: the gradients of parameters shared between
  modules (tied embeddings) summed between their owners, then with D > 1 replicas each module's
  gradients averaged over its replicas and BatchNorm buffers broadcast from replica 0, as DDP does;
* ``clip_grad_norm_`` -- ``torch.nn.utils.clip_grad_norm_`` over the whole model;
* ``sum_over_last_modules`` / ``gather_from_last_modules`` / ``gather_objects_from_last_modules`` --
  the real values (the last modules') on every rank: what ``accelerator.gather`` / ``reduce`` /
  ``gather_for_metrics`` and Trainer's logs return with one process per module.

Each is a collective point: every rank of the pipeline calls it at the same place.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ..cut.partition import Stage
from .wire import Kind, Op

Rank = Any  # the ``Rank`` of ``rank.py``, which owns these (not imported: rank.py imports this file)


class Collectives:
    def __init__(self, rank: Rank) -> None:
        self.rank = rank
        self._tied: list[tuple[torch.nn.Parameter, list[int]]] = []  # shared parameters and their modules
        self._reduced = False  # this optimizer step's gradients are combined
        self._tied_live: set[int] = set()

    def find_tied(self, stages: list[Stage]) -> None:
        """The parameters several modules share, and which modules (after each capture)."""
        owners: dict[int, list[int]] = {}
        params: dict[int, torch.nn.Parameter] = {}
        for stage in stages:
            for p in stage.parameters():
                owners.setdefault(id(p), []).append(stage.index)
                params[id(p)] = p
        self._tied = [(params[i], sorted(set(s))) for i, s in owners.items() if len(set(s)) > 1]

    def on_step(self) -> None:
        self._reduced = False

    # ----------------------------------------------------------------------- gradients

    def reduce_gradients(self) -> set[int]:
        """Combine this optimizer step's gradients, once: tied weights summed over the modules that share
        them, then each module averaged over replicas.  Returns the ids of the tied parameters to update."""
        rank = self.rank
        rank.finish_step()
        if self._reduced:
            return self._tied_live
        live: set[int] = set()
        layout, transport = rank.layout, rank.transport
        s = layout.stage
        updated = bool(rank.method.updated_stages()[s]) if layout.num_modules > 1 else True
        header = rank.header(Kind.TIED, rank.batch)
        for p, owners in self._tied:
            if s not in owners:
                continue
            mine = p.grad if p.grad is not None else torch.zeros_like(p)
            for o in owners:
                if o != s:
                    transport.send(o, header, (mine, torch.tensor(float(updated))))
            parts, any_live = {s: mine}, updated
            for o in owners:
                if o != s:
                    _, (grad, flag) = rank.recv(o, Kind.TIED, "a tied parameter's gradient")
                    parts[o] = grad
                    any_live = any_live or bool(flag)
            total = parts[owners[0]].clone()
            for o in owners[1:]:
                total += parts[o].to(total.device)
            p.grad = total
            if any_live:
                live.add(id(p))
        transport.average_gradients(rank.stage.parameters())
        transport.broadcast_buffers(list(rank.stage.train.buffers()))
        self._reduced, self._tied_live = True, live
        return live

    def clip_grad_norm_(self, parameters: Any, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model: every module's gradients, each shared
        parameter once, after the replicas' average."""
        self.reduce_gradients()
        rank = self.rank
        wanted = {id(p) for p in parameters}
        s = rank.layout.stage
        first_owner = {id(p): owners[0] for p, owners in self._tied}
        own = rank.stage.parameters()
        grads = [p.grad for p in own if p.grad is not None and id(p) in wanted and first_owner.get(id(p), s) == s]
        norm_type = float(norm_type)
        zero = torch.zeros((), dtype=torch.float64, device=rank.device)  # one device-to-host copy, below
        what = "computing the global gradient norm"
        if norm_type == float("inf"):
            local = max((g.detach().abs().max().double() for g in grads), default=zero)
            total = rank.transport.all_reduce(local, what, op=torch.distributed.ReduceOp.MAX)
        else:
            local = sum((g.detach().double().abs().pow(norm_type).sum() for g in grads), zero)
            total = (rank.transport.all_reduce(local, what) / rank.layout.replicas).pow(1.0 / norm_type)
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for p in own:
            if p.grad is not None and id(p) in wanted:
                p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
        return total.to(torch.float32)

    # ----------------------------------------------------------------------- metrics

    def _is_last(self) -> bool:
        return self.rank.layout.stage == self.rank.layout.num_modules - 1

    def sum_over_last_modules(self, value: torch.Tensor) -> torch.Tensor:
        """The sum over replicas of ``value`` as computed on each replica's last module, on every rank."""
        self.rank.sync(Op.METRIC)
        out = value.detach().to(torch.float64) if self._is_last() else torch.zeros(value.shape, dtype=torch.float64)
        total = self.rank.transport.all_reduce(out, "summing a metric over the last modules")
        return total.to(value.dtype if value.is_floating_point() else torch.float64).to(value.device)

    def gather_from_last_modules(self, data: Any) -> Any:
        """What ``accelerator.gather`` returns in D data-parallel processes: the last modules' values, concatenated
        over replicas, on every rank."""
        self.rank.sync(Op.METRIC)
        last = self._is_last()
        mine = tree_map(lambda t: t.detach().cpu() if isinstance(t, torch.Tensor) else t, data) if last else None
        parts = [p for p in self.rank.transport.gather_objects(mine) if p is not None]
        leaves = [tree_flatten(p) for p in parts]
        spec = leaves[0][1]
        out = []
        for i in range(len(leaves[0][0])):
            values = [lv[0][i] for lv in leaves]
            if isinstance(values[0], torch.Tensor):
                values = [v.reshape(1) if v.dim() == 0 else v for v in values]
                out.append(torch.cat(values).to(self.rank.device))
            else:
                out.append(values)
        return tree_unflatten(out, spec)

    def gather_objects_from_last_modules(self, obj: Any) -> list[Any]:
        """Each replica's last module's ``obj`` (picklable), in replica order, on every rank."""
        self.rank.sync(Op.METRIC)
        last = self._is_last()
        parts = self.rank.transport.gather_objects((last, obj if last else None))
        return [o for is_last, o in parts if is_last]
