"""The reduce as a tree of merges over groups of partials, on the cluster's CPUs.

The records are cut into consecutive groups; each group is one task (`cluster.tasks.run`, one
CPU) that reads its group's partial tables (on threads for object stores, see
`reduce._read_ahead`) and returns the group's merged candidates; the driver folds only the group
results, as they finish. With one group the same task body runs in this process.

    index, bottom    a group returns its `GlobalTopK` result: at most k rows per (layer, unit),
                     ranked within the group. Exact: `topk.merge` keeps, per (layer, unit), the k
                     best rows distinct in `by` in the total order (activation desc, image_id
                     asc). A row of the global top-k has fewer than k distinct rows above it
                     anywhere, so fewer in its group: it is in its group's top-k, and merging the
                     group results gives the global top-k, the same rows as the single-process
                     merge whatever the grouping and completion order. Distinct content needs
                     nothing more: the best row of a content in the global top-k is its best row
                     in its group, above which fewer than k contents rank there too.
    perceptual       the same with k = depth and distinct content; each group also returns the
                     pHash of every content it keeps (a content's pHash is the same in every
                     partial), which covers every content of the merged list.
    samples          a group returns its partials' rows of the sample S (priority below the
                     run's threshold), concatenated; the driver concatenates them in group
                     order, which is record order, so `samples.select` sees the same table.
    stats            a group returns its partials' statistics merged (`StatsMerge.state`); the
                     driver merges those. Count, min, max, fire count and histogram are exact;
                     mean and std equal the serial merge up to float64 rounding, and quantiles
                     stay within `stats.RANK_ERROR` (KLL merges are randomised anyway).

Group size (`group_size`): groups = min(TASKS_PER_CPU x CPUs, MAX_GROUPS, partials // MIN_GROUP),
each of ceil(partials / groups) consecutive partials. Several tasks per CPU balance stragglers
and make a retried task cheap; MIN_GROUP keeps a task's start-up small against its reads; the
driver folds at most MAX_GROUPS results (O(groups x units x k) rows in the worst case; in
practice one result at a time, floor-pruned by `GlobalTopK`). One CPU, or fewer than
TREE_PARTIALS partials: one group, in this process (a fresh Ray worker needs seconds to start
and import torch, about what merging TREE_PARTIALS ResNet-50 partials takes in process).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.cluster import tasks
from pipeline.index import faults
from pipeline.index.reduce import GlobalTopK, _read_ahead, read_topk
from pipeline.index.stats import StatsMerge
from pipeline.index.topk import negated
from pipeline.store import partials
from pipeline.store.partials import AttemptRef
from pipeline.store.schemas import conform, empty
from pipeline.store.storage import Store

MIN_GROUP = 32  # partials per task at least: a task's start-up is small against its reads
TREE_PARTIALS = 512  # fewer partials merge in this process: a fresh Ray worker takes seconds
# to start and import torch, about what merging 512 ResNet-50 partials takes
TASKS_PER_CPU = 4  # groups per CPU: stragglers and a retried task cost a quarter of a share
MAX_GROUPS = 1024  # group results the driver folds at most
WAIT_SECONDS = 300.0  # --worker-wait's default: tasks wait this long for a node with a CPU
SESSION_PARTIALS = 2048  # a run with nothing to map starts Ray for its reduce from this many


def group_size(partials: int, cpus: int) -> int:
    """Partials per group for `partials` partials on `cpus` CPUs (see the module docstring)."""
    if cpus <= 1 or partials < TREE_PARTIALS:
        return max(1, partials)
    groups = min(TASKS_PER_CPU * cpus, MAX_GROUPS, partials // MIN_GROUP)
    return max(1, math.ceil(partials / max(1, groups)))


def wants_session(partials: int) -> bool:
    """Whether a run that maps nothing should still start (or join) Ray for its reduce: only
    when the reduce is long enough that the cluster's CPUs repay Ray's start-up (seconds)."""
    return partials >= SESSION_PARTIALS


@dataclass(frozen=True)
class Source:
    """Where a task finds the partials (a Store is rebuilt in the task from its URL)."""

    url: str
    storage_options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, store: Store) -> Source:
        return cls(store.url, dict(store.storage_options))

    def store(self) -> Store:
        return Store(self.url, self.storage_options)


@dataclass(frozen=True)
class TopKJob:
    """One exact top-k reduce: which partial table, how many rows, what counts once."""

    k: int
    by: str = "image_id"  # rows equal in this column count once (topk.merge)
    table: str = "topk"  # the partial table: "topk" or "bottom"
    negate: bool = False  # bottom: merged as the top of -activation (the result stays negated)
    phash: bool = False  # perceptual: each group also returns its kept contents' pHashes


@dataclass
class TreeReport:
    """How the last reduce ran (for the manifest and the progress line)."""

    partials: int = 0
    groups: int = 0
    group_size: int = 0
    cpus: int = 0
    on_cluster: bool = False

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def merge_topk(
    store: Store,
    records: Sequence[AttemptRef],
    job: TopKJob,
    report: TreeReport | None = None,
    wait: float = WAIT_SECONDS,
) -> tuple[pa.Table, dict[str, int]]:
    """(the exact global top-k of `job` in schema "partial", pHash per kept content if
    `job.phash`): the group results folded into one `GlobalTopK` as they finish."""
    phashes: dict[str, int] = {}

    def results() -> Iterator[pa.Table]:
        for _, (table, found) in _groups(store, records, topk_group, (job,), report, wait):
            phashes.update(found)
            yield table

    table = fold_topk(results(), job.k, job.by)
    return table, phashes


def fold_topk(parts: Iterable[pa.Table], k: int, by: str) -> pa.Table:
    """The top-k of `parts` (schema "partial", strings plain or dictionary-encoded) as one
    `GlobalTopK` folds them: a group's merge in a task, and the driver's merge of the groups."""
    reducer = GlobalTopK(k, by=by)
    for part in parts:
        reducer.add(part)
    return reducer.table()


def topk_group(
    source: Source, records: list[AttemptRef], job: TopKJob
) -> tuple[pa.Table, dict[str, int]]:
    """Task body: the group's merged top-k (schema "partial", at most k rows per unit) and, with
    `job.phash`, the pHash of every content it keeps."""
    store = source.store()
    read = functools.partial(read_topk, store, table=job.table)
    parts = _faulty(_read_ahead(read, records, store))
    table = fold_topk((negated(p) for p in parts) if job.negate else parts, job.k, job.by)
    return table, (_phashes(store, records, table) if job.phash else {})


def _faulty(parts: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """`parts`, with the test-only faults of index/faults.py after each (unset: none)."""
    for part in parts:
        faults.after_batch()
        yield part


def _phashes(store: Store, records: list[AttemptRef], kept: pa.Table) -> dict[str, int]:
    wanted = pc.unique(kept["image_hash"])
    found: dict[str, int] = {}
    read = functools.partial(partials.read_table, store, table="phash")
    for table in _read_ahead(read, records, store):
        table = table.filter(pc.is_in(table["image_hash"], value_set=wanted))
        found.update(zip(table["image_hash"].to_pylist(), table["phash"].to_pylist(), strict=True))
    return found


def merge_samples(
    store: Store, records: Sequence[AttemptRef], limit: int, wait: float = WAIT_SECONDS
) -> pa.Table:
    """Every partial's rows of the sample S with priority below `limit` (schema
    "samples_state"), in record order."""
    results = dict(_groups(store, records, samples_group, (limit,), None, wait))
    parts = [results[i] for i in sorted(results)]
    return pa.concat_tables(parts) if parts else empty("samples_state")


def samples_group(source: Source, records: list[AttemptRef], limit: int) -> pa.Table:
    """Task body: the group's rows of S below `limit`, in record order."""
    store = source.store()
    read = functools.partial(partials.read_table, store, table="samples")
    kept = [t.filter(pc.less(t["priority"], limit)) for t in _read_ahead(read, records, store)]
    return conform(pa.concat_tables(kept), "samples_state") if kept else empty("samples_state")


def merge_stats(
    store: Store, records: Sequence[AttemptRef], wait: float = WAIT_SECONDS
) -> StatsMerge:
    """Every partial's statistics merged (see the module docstring for what is exact)."""
    merged = StatsMerge()
    for _, state in _groups(store, records, stats_group, (), None, wait):
        merged.add(state)
    return merged


def stats_group(source: Source, records: list[AttemptRef]) -> pa.Table:
    """Task body: the group's statistics merged, as one "stats_state" table."""
    store = source.store()
    merged = StatsMerge()
    read = functools.partial(partials.read_table, store, table="stats")
    for table in _read_ahead(read, records, store):
        merged.add(table)
    return merged.state()


def _groups(
    store: Store,
    records: Sequence[AttemptRef],
    body: Callable[..., Any],
    args: tuple,
    report: TreeReport | None,
    wait: float,
) -> Iterator[tuple[int, Any]]:
    """(group index, `body(source, group, *args)`) for every group, as each finishes: tasks on
    the cluster when there is more than one group, else the one group in this process."""
    cpus = tasks.cpus()
    size = group_size(len(records), cpus)
    groups = [list(records[i : i + size]) for i in range(0, len(records), size)]
    calls = [(Source.of(store), group, *args) for group in groups]
    on_cluster = len(groups) > 1
    if report is not None:
        report.partials, report.groups, report.group_size = len(records), len(groups), size
        report.cpus, report.on_cluster = cpus, on_cluster
    if not on_cluster:
        yield from ((i, body(*call)) for i, call in enumerate(calls))
        return
    name = body.__name__
    yield from tasks.run(
        body, calls, wait=wait, name=lambda i: f"reduce task {i + 1} of {len(groups)} ({name})"
    )


def reduce_line(report: TreeReport) -> str:
    """What a progress line says of how the reduce ran."""
    if not report.on_cluster:
        return f"{report.partials} partials merged in this process"
    return (
        f"{report.partials} partials merged by {report.groups} tasks of up to "
        f"{report.group_size} on the cluster's {report.cpus} CPUs"
    )
