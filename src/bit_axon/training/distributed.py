"""Data parallelism over ``mx.distributed``: the few collective operations the trainer needs.

``mlx.launch`` starts W copies of a command; ``mx.distributed.init()`` gives each its rank and W.
Every rank runs the same training loop on its own shard of the batches (``shard``); the gradients
and the token counts they are normalised by are summed across ranks before the update
(``all_sum_tree``), so W processes with batch size B take the steps one process with batch size
W * B takes. Rank 0 is the only one that reads or writes files: it loads a checkpoint and sends it
to the others (``broadcast_tree``). Ranks agree on when to stop by exchanging their flags
(``gather_rows``) and refuse to start when their data or settings differ (``check_same``).

Without ``mlx.launch`` the group is a singleton; the trainer then makes no collective calls at all.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import TypeVar

from bit_axon.training.cooling import ThermalShutdownError

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

T = TypeVar("T")


def shard(batches: Iterator[T], rank: int, size: int, start: int = 0) -> Iterator[T]:
    """This rank's share of a global batch stream, from global position ``start`` on.

    ``batches`` yields global batches 0, 1, 2, ...; the shard of rank ``rank`` out of ``size`` is
    global batches ``start + rank``, ``start + rank + size``, ``start + rank + 2 * size``, ... So
    at micro-step j the ranks together hold global batches ``start + j * size`` to
    ``start + (j + 1) * size - 1``: with a row-level batch iterator (``iterate_batches`` with
    ``loop=True``: global batch i of size B is rows iB .. (i + 1)B - 1) those are exactly the rows of
    batch j of size ``size * B`` that a single process would see. ``start`` is a global position,
    counted in batches of the per-rank size, as the trainer's ``batches_consumed``.
    """
    if not 0 <= rank < size:
        raise ValueError(f"rank must be in [0, {size}), got {rank}")
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    # Every rank builds every batch and drops the others' (collation is cheap next to a training
    # step), so all ranks stay at the same place in the one deterministic stream.
    return itertools.islice(batches, start + rank, None, size)


def all_sum_tree(tree: T, group: mx.distributed.Group) -> T:
    """Sum every array of ``tree`` across ``group``; ranks must hold trees of the same structure.

    The arrays are concatenated (one collective per dtype, in key order) rather than reduced one by
    one: adapter gradients are many small arrays, and each collective pays the network latency.
    """
    if group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    leaves = [value for _, value in flat]
    groups: dict[mx.Dtype, list[int]] = {}
    for i in sorted(range(len(flat)), key=lambda i: flat[i][0]):  # key order, the same on every rank
        groups.setdefault(leaves[i].dtype, []).append(i)
    for indices in groups.values():
        summed = mx.distributed.all_sum(mx.concatenate([leaves[i].reshape(-1) for i in indices]), group=group)
        offsets = list(itertools.accumulate(leaves[i].size for i in indices))[:-1]
        for i, part in zip(indices, mx.split(summed, offsets), strict=True):
            leaves[i] = part.reshape(leaves[i].shape)
    # tree_map visits the leaves in tree_flatten's order; unlike tree_unflatten it keeps empty
    # containers (a batch without metrics) in place.
    remaining = iter(leaves)
    return tree_map(lambda _: next(remaining), tree)


def broadcast_tree(tree: T, group: mx.distributed.Group) -> T:
    """Rank 0's ``tree`` on every rank; the other ranks' trees only give the structure, shapes and dtypes.

    A sum in which every rank but 0 contributes zeros: exact, and it needs no backend support for
    point-to-point sends.
    """
    if group.size() == 1:
        return tree
    flat = tree_flatten(tree)
    check_same({"arrays": len(flat), "elements": sum(v.size for _, v in flat)}, group, what="the state to broadcast")
    if group.rank() != 0:
        tree = tree_map(mx.zeros_like, tree)
    return all_sum_tree(tree, group)


def gather_rows(values: Sequence[float], group: mx.distributed.Group) -> list[list[float]]:
    """Every rank's ``values``, indexed by rank: small control messages (stop flags, temperatures)."""
    if group.size() == 1:
        return [list(values)]
    gathered = mx.distributed.all_gather(mx.array([list(values)], dtype=mx.float32), group=group)
    return gathered.tolist()


def check_same(values: Mapping[str, int], group: mx.distributed.Group, what: str = "the ranks' settings") -> None:
    """Raise ``ValueError`` on every rank when the ranks disagree on any of ``values``.

    Each machine reads its own copy of the data and settings; a different file on one of them would
    otherwise train on a mix of two datasets without any error.
    """
    if group.size() == 1:
        return
    rows = mx.distributed.all_gather(mx.array([list(values.values())], dtype=mx.int64), group=group).tolist()
    differ = [
        f"{name} ({', '.join(f'rank {r}: {row[i]}' for r, row in enumerate(rows))})"
        for i, name in enumerate(values)
        if len({row[i] for row in rows}) > 1
    ]
    if differ:
        raise ValueError(
            f"The {group.size()} processes disagree on {what}: {'; '.join(differ)}. Every machine needs the "
            "same data files, base model and arguments."
        )


def agree_to_stop(
    stop: bool, hot: ThermalShutdownError | None, group: mx.distributed.Group, step: int
) -> tuple[bool, ThermalShutdownError | None]:
    """Every rank's stop request and thermal stop (before ``step``), so that all ranks stop before the same step.

    A rank that left the loop alone would leave the others waiting in the next gradient sum. The
    thermal stop of the hottest rank is raised everywhere.
    """
    rows = gather_rows(
        [float(stop), float(hot is not None), hot.temperature if hot else 0.0, hot.stop_temp if hot else 0.0], group
    )
    if hot is None:
        hottest = max(rows, key=lambda row: (row[1], row[2]))
        if hottest[1]:
            hot = ThermalShutdownError(hottest[2], hottest[3], step)
    return any(row[0] for row in rows), hot
