"""Data-parallel shards of token sequences walking the model layer by layer (calibration, Fisher,
streamed evaluation), driven from here whatever the executor.

Every call made to the shards is recorded, so a shard whose worker dies is rebuilt by replaying the
calls it had seen on a new worker — same inputs, same state, same numbers — and its call repeated.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Callable

import torch

from rankfold.execution.base import Executor, ShardLost
from rankfold.workers.layer_statistics import sum_stats
from rankfold.workers.reduce import ReduceItem, reduce_statistics
from rankfold.workers.shard import LayerStep, SequenceShard, ShardConfig

log = logging.getLogger(__name__)
MAX_SHARD_REBUILDS = 3
# Partials one shard sums in a round of the reduction tree. Up to this many shards a layer's partials are
# summed by one shard in shard order (the bits of a sum in the driver); past it, groups of this many are
# summed in parallel, round after round: log_F(N) rounds, each shard fetching at most F − 1 partials of
# 4.1 GB (Llama-3-70B, packed) from other nodes, instead of one shard fetching N − 1.
REDUCE_FAN_IN = 4


class ShardGroup:
    """Shards in lockstep. `call` sends one call to every shard (in shard order) and records it —
    with `replay_args`, if given, as the cheaper arguments a rebuilt shard replays it with. `shard_class`:
    a SequenceShard subclass (the anchored walk's two-stream shard); None: SequenceShard, looked up when
    the group is made (so a test can swap the module's class)."""

    def __init__(self, executor: Executor, stage: str, config: ShardConfig, parts: int,
                 shard_class: type[SequenceShard] | None = None, fan_in: int | None = None):
        shard_class = shard_class or SequenceShard
        self.fan_in = fan_in or REDUCE_FAN_IN
        self.executor, self.stage, self.config, self.shard_class = executor, stage, config, shard_class
        self.shards = executor.actors(shard_class, [(config,)] * parts)
        self.history: list[list[tuple[str, tuple]]] = [[] for _ in range(parts)]
        self.rebuilds = [0] * parts
        self._reducer = 0  # the shard that sums the next partials (in turn: the memory spreads)

    def call_each(self, method: str, args_per_shard: list[tuple]) -> list[Any]:
        for calls, args in zip(self.history, args_per_shard, strict=True):
            if method == "load":  # a load starts the shard afresh: nothing before it needs replaying
                calls.clear()
            calls.append((method, args))
        return self.executor.call_each(self.shards, method, args_per_shard)

    def call(self, method: str, *args, replay_args: tuple | None = None, record: bool = True) -> list[Any]:
        """`method` on every shard (a lost one rebuilt and asked again); recorded for replay unless `record`
        is False (a call that leaves the shard as it was: replaying it would only ship its result again)."""
        ask = lambda k: self.executor.call_all_settled([self.shards[k]], method, *args)[0]  # noqa: E731
        partials = [self._answered(k, partial, ask)
                    for k, partial in enumerate(self.executor.call_all_settled(self.shards, method, *args))]
        if record:
            self._record(method, args if replay_args is None else replay_args)
        return partials

    def call_reduced(self, method: str, *args, reduce: Callable[..., Any], item: Any,
                     replay_args: tuple | None = None, record: bool = True) -> Any:
        """Like `call`, but the shards' results (partial sums) are not returned to the driver: they go, in
        shard order, to `reduce(item, partials)` run by one shard, each call the next (Executor.reduce);
        returns its result. Past `fan_in` shards the partials are first summed in groups, in rounds of a
        tree (`_combined`). A reducing shard that dies is rebuilt and reduces again (the partials wait in
        the object store); a partial lost with its node in between fails the stage (Ray's ObjectLostError):
        run again, calibration resumes at the first layer whose sum was not stored (`stream_shards`)."""
        split = lambda k: self.executor.call_all_split([self.shards[k]], "split", method, *args)[0]  # noqa: E731
        pairs = [self._answered(k, pair, split)
                 for k, pair in enumerate(self.executor.call_all_split(self.shards, "split", method, *args))]
        if record:
            self._record(method, args if replay_args is None else replay_args)
        k, self._reducer = self._reducer, (self._reducer + 1) % len(self.shards)
        partials, owners = [partial for _, partial in pairs], list(range(len(pairs)))
        while len(partials) > self.fan_in:
            partials, owners = self._combined(partials, owners)
        reduced = lambda k: self.executor.reduce(reduce, item, partials, self.shards[k])  # noqa: E731
        return self._answered(k, reduced(k), reduced)

    def _combined(self, partials: list, owners: list[int]) -> tuple[list, list[int]]:
        """One round of the tree: consecutive groups of `fan_in` partials each summed (in order) by the
        shard that made the group's first — its own partial is local — all groups at once. Returns the
        round's partials and the shards holding them."""
        groups = [list(range(start, min(start + self.fan_in, len(partials))))
                  for start in range(0, len(partials), self.fan_in)]
        merged = [group for group in groups if len(group) > 1]  # a last group of one passes as it is
        summed = iter(self.executor.combine(sum_stats, [[partials[j] for j in group] for group in merged],
                                            [self.shards[owners[group[0]]] for group in merged]))
        results = []
        for group in groups:
            if len(group) == 1:
                results.append(partials[group[0]])
                continue
            ask = lambda k, group=group: self.executor.combine(  # noqa: E731
                sum_stats, [[partials[j] for j in group]], [self.shards[k]])[0]
            results.append(self._answered(owners[group[0]], next(summed), ask))
        return results, [owners[group[0]] for group in groups]

    def run_on(self, k: int, method: str, *args) -> Any:
        """One stateless call on shard k alone, not recorded for replay (a lost shard is rebuilt and
        asked again). For a task run where the shards already hold the workers' resources: submitted as
        a separate task it would wait forever on a cluster the shards fill."""
        ask = lambda k: self.executor.call_all_settled([self.shards[k]], method, *args)[0]  # noqa: E731
        return self._answered(k, ask(k), ask)

    def _answered(self, k: int, outcome: Any, ask: Callable[[int], Any]) -> Any:
        """Shard k's outcome; while it is ShardLost, shard k rebuilt and asked again (`ask(k)`)."""
        while isinstance(outcome, ShardLost):
            self._rebuild(k, outcome)
            outcome = ask(k)
        return outcome

    def _record(self, method: str, args: tuple) -> None:
        for calls in self.history:
            calls.append((method, args))

    def _rebuild(self, k: int, lost: ShardLost) -> None:
        self.rebuilds[k] += 1
        if self.rebuilds[k] > MAX_SHARD_REBUILDS:
            raise RuntimeError(f"{self.stage}: shard {k} lost {self.rebuilds[k]} times (last: {lost.reason}); giving up")
        log.warning("%s: shard %d lost after %d calls (%s); rebuilding it", self.stage, k, len(self.history[k]),
                    lost.reason)
        self.shards[k] = self.executor.actors(self.shard_class, [(self.config,)])[0]
        for method, args in self.history[k]:
            self.executor.call_each([self.shards[k]], method, [args])

    def release(self) -> None:
        self.executor.release(self.shards)


def split_rows(rows: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """Contiguous, nearly equal shards (never an empty one) of (samples, seq) token ids."""
    parts = max(1, min(parts, rows.shape[0]))
    return [chunk for chunk in torch.tensor_split(rows, parts) if chunk.shape[0]]


def split_batches(rows: torch.Tensor, batch_size: int, parts: int) -> list[torch.Tensor]:
    """Contiguous shards made of whole batches, so a batch (whose gradient is squared) never spans
    two shards and the result does not depend on the number of workers."""
    starts = list(range(0, rows.shape[0], batch_size))
    groups = [chunk for chunk in torch.tensor_split(torch.tensor(starts), max(1, min(parts, len(starts)))) if len(chunk)]
    return [rows[int(group[0]):min(int(group[-1]) + batch_size, rows.shape[0])] for group in groups]


def per_shard_config(config: ShardConfig, executor: Executor, parts: int) -> ShardConfig:
    """Each shard's share of the host memory budget, and the executor's threads, device and device budget
    per worker (each shard has a device of its own, or its share of one)."""
    share = getattr(executor, "gpus_per_worker", 0.0) or 1.0  # in-process: the whole GPU
    return replace(config, budget_bytes=config.budget_bytes // parts, threads=executor.threads_per_worker,
                   device=executor.device, device_budget_bytes=executor.device_activations_bytes,
                   gpu_share=min(share, 1.0))


def stream_shards(executor: Executor, config: ShardConfig, ids: torch.Tensor, batch_size: int, stage: str,
                  num_layers: int, layout: Callable[[int], list[dict] | None] = lambda i: None,
                  reduce_into: Callable[[int], ReduceItem] | None = None,
                  on_reduced: Callable[[int, Any], None] = lambda i, result: None,
                  stored: Callable[[ReduceItem], Any] = lambda item: None) -> ShardGroup:
    """Push `ids` through every layer, split over the executor's workers. With `reduce_into` (calibration),
    each layer's input statistics are summed over the shards in shard order where they are and stored
    (workers/reduce.py, `reduce_into(i)` says where); `on_reduced(i, (sha256, few_tokens))` gets the small
    result — `stored(item)` when it is not None (an interrupted run stored that layer's: the shards only pass
    through it, and stop after the last layer still to reduce). Without, the activations after the last
    layer are kept (evaluation). `layout(i)`: layer i's compressed modules (JSON) or None. Returns the
    shards — call `release()` on them."""
    kept, items = {}, {}
    if reduce_into is not None:
        items = {i: reduce_into(i) for i in range(num_layers)}
        kept = {i: result for i, item in items.items() if (result := stored(item)) is not None}
        if kept:
            log.info("%s: %d of %d layers' statistics stored by an interrupted run: passed through, not reduced",
                     stage, len(kept), num_layers)
        for i in sorted(kept):
            on_reduced(i, kept[i])
        num_layers = max((i + 1 for i in range(num_layers) if i not in kept), default=0)
    if num_layers == 0:  # every layer stored: no shard to start
        return ShardGroup(executor, stage, config, 0)
    parts = split_rows(ids, executor.workers)
    shards = ShardGroup(executor, stage, per_shard_config(config, executor, len(parts)), len(parts))
    try:
        shards.call_each("load", [(part, batch_size) for part in parts])
        for i in executor.steps(range(num_layers), stage):
            step = LayerStep(layout(i), collect_stats=reduce_into is not None and i not in kept,
                             keep_outputs=reduce_into is None or i < num_layers - 1)
            replay = (i, replace(step, collect_stats=False))
            if step.collect_stats:
                on_reduced(i, shards.call_reduced("advance", i, step, reduce=reduce_statistics, item=items[i],
                                                  replay_args=replay))
            else:
                shards.call("advance", i, step, replay_args=replay)
    except BaseException:
        shards.release()
        raise
    return shards


def stream_fisher(executor: Executor, config: ShardConfig, ids: torch.Tensor, batch_size: int, num_layers: int,
                  on_layer: Callable[[int, dict[str, torch.Tensor]], None]) -> dict:
    """Forward `ids` through every layer keeping each layer's input, then walk the layers in reverse
    (streamed backward): `on_layer(i, sums)` receives layer i's Fisher sums reduced over shards in
    shard order. Returns {"batches", "loss"} (loss: mean over batches of the batch loss, for the log)."""
    parts = split_batches(ids, batch_size, executor.workers)
    shards = ShardGroup(executor, "fisher", per_shard_config(config, executor, len(parts)), len(parts))
    try:
        shards.call_each("load", [(part, batch_size) for part in parts])
        for i in executor.steps(range(num_layers), "fisher forward"):
            shards.call("advance", i, LayerStep(None, collect_stats=False, keep_input=True))
        losses = shards.call("fisher_head")
        for i in executor.steps(range(num_layers - 1, -1, -1), "fisher backward"):
            on_layer(i, sum_stats(shards.call("fisher_backward", i)))
    finally:
        shards.release()
    batches = sum(-(-part.shape[0] // batch_size) for part in parts)
    return {"batches": batches, "loss": sum(losses) / batches}
