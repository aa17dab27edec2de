"""index.reduce_tree on a real 2-node Ray cluster on 127.0.0.1 (tests/helpers/multinode.py): the
tasks run on both nodes; a task whose worker dies, and the tasks of the worker node killed
mid-reduce, are retried on what remains; the index still equals the single-process merge bit for
bit."""

from __future__ import annotations

import threading
import time

import pytest

from multinode import LocalCluster
from pipeline.index import reduce_tree
from pipeline.index.reduce import merge_partials
from pipeline.index.reduce_tree import TopKJob, TreeReport
from pipeline.store import partials
from pipeline.store.schemas import conform
from pipeline.store.storage import Store
from tests.index.test_reduce_tree import images_table, random_partials

pytestmark = pytest.mark.multinode


@pytest.fixture(scope="module")
def marker(tmp_path_factory):
    return tmp_path_factory.mktemp("faults") / "exit_once"


@pytest.fixture(scope="module")
def cluster(marker):
    """A head and a worker node of one CPU each; each task sleeps 0.15 s after every partial it
    merges, and the first to merge one kills its own worker."""
    local = LocalCluster(env={"NINEBEST_FAULTS": f"delay=0.15;exit_once={marker}"}, head_cpus=1)
    local.add(num_gpus=0)
    local.wait_alive(1)
    yield local
    local.shutdown()


def test_a_node_lost_mid_reduce_changes_nothing(cluster, marker, tmp_path, monkeypatch):
    store = Store(str(tmp_path / "out"))
    parts = random_partials(3, shards=32, depth=5, levels=3, contents=7)
    records = [
        partials.write(store, f"s{s:02d}", "a", "run", part, images_table(), {})
        for s, part in enumerate(parts)
    ]
    single = merge_partials(store, records, 3, "image_hash")
    monkeypatch.setattr(reduce_tree, "TREE_PARTIALS", 2)
    monkeypatch.setattr(reduce_tree, "MIN_GROUP", 2)
    report, result = TreeReport(), {}

    def reduce() -> None:
        job = TopKJob(3, by="image_hash")
        result["table"], _ = reduce_tree.merge_topk(store, records, job, report)

    run = threading.Thread(target=reduce, daemon=True)
    run.start()
    deadline = time.monotonic() + 60
    while not marker.exists():  # a task merged its first partial: the reduce is under way
        assert time.monotonic() < deadline and run.is_alive(), "no reduce task started"
        time.sleep(0.05)
    cluster.kill(cluster.workers[0])  # 8 tasks of 4 partials, 0.6 s each: most are left
    run.join(timeout=120)
    assert not run.is_alive(), "the reduce hangs"
    assert marker.exists(), "a task's worker died once"
    assert (report.groups, report.group_size, report.cpus) == (8, 4, 2)
    assert conform(result["table"], "index").equals(single)
