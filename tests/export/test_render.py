"""Tests for pipeline/render.py's deconvnet passes (the image functions are tested end to end by
tests/test_export.py): every row exactly once, in order, whole images kept together."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pipeline.export.render import passes


def pairs_of(counts: list[int]) -> list[tuple[dict, int]]:
    """(row, image position) pairs, image by image as `export_images` builds them."""
    return [
        ({"row": (image, i)}, image) for image, count in enumerate(counts) for i in range(count)
    ]


@given(counts=st.lists(st.integers(1, 40), max_size=12), size=st.integers(1, 32))
def test_passes_keep_every_row_once_and_images_whole(counts: list[int], size: int) -> None:
    group = pairs_of(counts)
    chunks = passes(group, size)
    assert [pair for chunk in chunks for pair in chunk] == group  # every row once, in order
    assert all(0 < len(chunk) <= size for chunk in chunks)
    for image, count in enumerate(counts):
        holding = [i for i, chunk in enumerate(chunks) if any(p[1] == image for p in chunk)]
        assert len(holding) == -(-count // size)  # split only when it alone exceeds a pass
    assert len(chunks) <= len(counts) + sum(count // size for count in counts)


def test_passes_by_hand() -> None:
    # images with 3, 2, 5 and 1 rows, passes of at most 4 rows
    lengths = [[p[1] for p in chunk] for chunk in passes(pairs_of([3, 2, 5, 1]), 4)]
    assert lengths == [[0, 0, 0], [1, 1], [2, 2, 2, 2], [2, 3]]
