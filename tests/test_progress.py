"""progress.Progress: the lines the driver prints to a log and to a terminal, on a fake clock."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

import pipeline.progress
from pipeline.progress import Progress

MANIFEST = {
    "counts": {"indexed": 45, "images": 48, "bad": 3, "index_rows": 4608},
    "timings": {"total_seconds": 12.34, "map_seconds": 10.0, "reduce_seconds": 1.26},
    "layers": ["layer3", "layer4"],
}
FINISH = (
    "indexed 45 of 48 images (3 bad) into 2 layers, 4608 index rows, "
    "in 12.3 s (map 10.0 s, reduce 1.3 s)\n"
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def clock(monkeypatch):
    """pipeline.progress's time.perf_counter, set by hand: `clock.now = 3.0`."""
    fake = SimpleNamespace(now=100.0)
    monkeypatch.setattr(pipeline.progress, "time", SimpleNamespace(perf_counter=lambda: fake.now))
    return fake


def shard(images: int, bad: int = 0) -> dict:
    return {"images": images, "bad": bad}


def test_log_stream_prints_at_most_every_interval_and_always_the_last_shard(clock):
    stream = io.StringIO()
    progress = Progress(stream, interval=5.0)
    progress.start(total=4, resumed=0)
    for now, record in [(102.0, shard(20, 1)), (103.0, shard(10)), (108.0, shard(30, 2))]:
        clock.now = now
        progress.shard_done(record)
    clock.now = 109.0  # 1 s after the last line, but the last shard
    progress.shard_done(shard(30))
    assert stream.getvalue().splitlines() == [
        "map: 1/4 shards | 20 images | 10.0 img/s | 1 bad",  # 20 images in 2 s
        "map: 3/4 shards | 60 images | 7.5 img/s | 3 bad",  # the 2nd was within 5 s of the 1st
        "map: 4/4 shards | 90 images | 10.0 img/s | 3 bad",
    ]
    assert "\r" not in stream.getvalue()


def test_rate_is_rounded_to_one_decimal(clock):
    stream = io.StringIO()
    progress = Progress(stream, interval=0.0)
    progress.start(total=3, resumed=0)
    for now, images in [(103.0, 10), (106.0, 0), (107.0, 1)]:
        clock.now = now
        progress.shard_done(shard(images))
    rates = [line.split(" | ")[2] for line in stream.getvalue().splitlines()]
    assert rates == ["3.3 img/s", "1.7 img/s", "1.6 img/s"]  # 10/3, 10/6, 11/7


def test_resumed_shards_count_as_done_but_not_as_images(clock):
    stream = io.StringIO()
    progress = Progress(stream)
    progress.start(total=5, resumed=2)
    clock.now = 104.0
    progress.shard_done(shard(8))
    assert stream.getvalue().splitlines() == [
        "resuming: 2 of 5 shards already done",
        "map: 3/5 shards | 8 images | 2.0 img/s | 0 bad",
    ]


def test_terminal_redraws_every_shard_in_place_and_ends_the_line_at_the_last(clock):
    stream = Terminal()
    progress = Progress(stream, interval=60.0)
    progress.start(total=2, resumed=0)
    clock.now = 101.0
    progress.shard_done(shard(4))
    clock.now = 102.0  # within the interval: a terminal redraws anyway
    progress.shard_done(shard(6, 1))
    progress.say("done")
    assert stream.getvalue() == (
        "\rmap: 1/2 shards | 4 images | 4.0 img/s | 0 bad\r"
        "\rmap: 2/2 shards | 10 images | 5.0 img/s | 1 bad\n"
        "\rdone\n"
    )


def test_finish_line_and_say(clock):
    stream = io.StringIO()
    progress = Progress(stream)
    progress.finish(MANIFEST)
    progress.say("read it with pd.read_parquet('out/index')")
    assert stream.getvalue() == FINISH + "read it with pd.read_parquet('out/index')\n"


def test_quiet_prints_nothing(clock):
    for stream in (io.StringIO(), Terminal()):
        progress = Progress(stream, interval=0.0, quiet=True)
        progress.start(total=2, resumed=1)
        clock.now = 101.0
        progress.shard_done(shard(3, 1))
        progress.finish(MANIFEST)
        progress.say("summary")
        assert stream.getvalue() == ""
        assert (progress.done, progress.images, progress.bad) == (2, 3, 1)  # still counted


def test_writes_to_stderr_by_default(clock, capsys):
    Progress().finish(MANIFEST)
    captured = capsys.readouterr()
    assert captured.err == FINISH and captured.out == ""
