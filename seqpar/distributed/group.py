"""The collectives a chain split over ranks needs, with failures agreed by every rank.

Every exchange is a ``torch.distributed`` collective on the caller's process
group (gloo on CPU, NCCL on GPU), bounded by that group's timeout
(``init_process_group(timeout=...)``). A rank whose local work raises still
joins the next collective with a failure flag instead of its row, so every
rank learns of it at that collective and raises (the failing rank its own
error, the others one naming that rank and its message): no rank waits on a
collective the others will never reach. Rows travel as float64, which holds
every float16, bfloat16, float32 and float64 value exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from ..runtime.errors import first_line


class RankFailure(RuntimeError):
    """Raised on every rank of a group when one of its ranks failed during a distributed chain solve."""


class Ranks:
    """The process ``group`` (default: the world; a one-dimensional ``DeviceMesh`` stands for its group) as a
    chain split over it sees it: ``rank``, ``size``, and the collectives :meth:`gather`, :meth:`broadcast`,
    :meth:`sum` whose inputs carry a local failure."""

    def __init__(self, group=None, *, what: str = "seqpar.distributed"):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(f"{what} needs torch.distributed initialised (torch.distributed.init_process_group) "
                             "on every rank of the group")
        if isinstance(group, DeviceMesh):
            if group.ndim != 1:
                raise ValueError(f"{what}: the device mesh has {group.ndim} dimensions; pass a one-dimensional "
                                 "mesh (mesh[name]) or its process group")
            group = group.get_group()
        self.group = group
        self.rank = dist.get_rank(group)
        if self.rank < 0:
            raise ValueError(f"{what}: this process (global rank {dist.get_rank()}) is not a member of the group")
        self.size = dist.get_world_size(group)
        self.what = what

    def gather(self, row: torch.Tensor | None, width: int, device, failure: BaseException | None = None):
        """Every rank's ``row`` (1-D, ``width`` values) as a float64 ``(size, width)`` tensor on ``device``.

        ``failure``: this rank's own error (``row`` is then ignored); if any rank
        failed, every rank raises (:meth:`_raise_agreed`) instead of returning.
        """
        mine = torch.zeros(width + 1, dtype=torch.float64, device=device)
        if failure is None and row is not None:
            mine[1:] = row.reshape(-1)
        mine[0] = float(failure is not None)
        rows = torch.empty(self.size * (width + 1), dtype=torch.float64, device=device)
        dist.all_gather_single(rows, mine, group=self.group)
        rows = rows.view(self.size, width + 1)
        self._raise_agreed(rows[:, 0], failure)
        return rows[:, 1:]

    def broadcast(self, row: torch.Tensor | None, width: int, source: int, device,
                  failure: BaseException | None = None) -> torch.Tensor:
        """``row`` of rank ``source`` (1-D, ``width`` values, float64) on every rank; a failure of ``source``
        (its ``failure``) raises on every rank. Only ``source``'s ``row`` and ``failure`` are read."""
        mine = torch.zeros(width + 1, dtype=torch.float64, device=device)
        if self.rank == source:
            if failure is None and row is not None:
                mine[1:] = row.reshape(-1)
            mine[0] = float(failure is not None)
        dist.broadcast(mine, group_source(self.group, source), group=self.group)
        flags = torch.zeros(self.size, dtype=torch.float64, device=device)
        flags[source] = mine[0]
        self._raise_agreed(flags, failure if self.rank == source else None)
        return mine[1:]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks (in place, returned)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def _raise_agreed(self, flags: torch.Tensor, failure: BaseException | None) -> None:
        """If any rank flagged a failure: every rank gathers the failures' messages (one object collective)
        and raises: the failing rank its own error, the others a :class:`RankFailure` (a ``ValueError`` when
        every failure was one: bad input is bad input on every rank) naming the ranks and messages."""
        failed = [index for index, flag in enumerate(flags.tolist()) if flag]
        if not failed:
            return
        message = None if failure is None else (type(failure).__name__, first_line(failure))
        messages = [None] * self.size
        dist.all_gather_object(messages, message, group=self.group)
        if failure is not None:
            raise failure
        reported = [(index, messages[index]) for index in failed if messages[index] is not None]
        text = "; ".join(f"rank {index}: {name}: {line}" for index, (name, line) in reported)
        error = ValueError if reported and all(name == "ValueError" for _, (name, _) in reported) else RankFailure
        raise error(f"{self.what}: {text}")


def group_source(group, rank: int) -> int:
    """The global rank of ``group``'s rank ``rank`` (what ``dist.broadcast`` takes as its source)."""
    return rank if group is None else dist.get_global_rank(group, rank)
