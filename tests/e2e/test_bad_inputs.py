"""Bad and unusual inputs end to end: every image mode is indexed, broken files are recorded,
and nothing is half-written (the behaviour table in README's "Bad inputs" section)."""

from __future__ import annotations

import io
import shutil
import struct
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.cli import main
from pipeline.config import IndexConfig, Preprocess
from pipeline.dataset.decode import BadImage, decode
from pipeline.index.run import index
from pipeline.progress import Progress

pytestmark = pytest.mark.usefixtures("ray_local")

# every decode path: Pillow, the device path (CPU decoder here), Pillow with reduced-size decode
DECODES = [{"decode": "pil"}, {"decode": "device"}, {"decode": "pil", "draft": True}]


def bomb() -> bytes:
    """A valid 1x1 PNG whose header claims 60000 x 60000 pixels."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, "PNG")
    data = buffer.getvalue()
    chunk = b"IHDR" + struct.pack(">IIBBBBB", 60000, 60000, 8, 0, 0, 0, 0)
    return (
        data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]
    )


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("odd")
    photo = Image.open(next(photos.rglob("astronaut_0.*"))).convert("RGB").resize((300, 200))
    photo.convert("L").save(root / "gray.png")
    photo.convert("P").save(root / "palette.png")
    photo.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(np.asarray(photo.convert("L"), dtype=np.uint16) * 257).save(root / "deep16.png")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(root / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    photo.save(root / "rotated.jpg", exif=exif.tobytes())
    big = Image.open(next(photos.rglob("astronaut_0.*"))).convert("RGB").resize((1100, 1300))
    big.save(root / "big_rotated.jpg", exif=exif.tobytes())  # reduced by --draft, then rotated
    photo.convert("L").save(root / "gray.jpg")
    photo.save(root / "progressive.jpg", progressive=True)
    jpeg = (root / "rotated.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    scan = jpeg.index(b"\xff\xda")
    (root / "noscan.jpg").write_bytes(jpeg[:scan] + b"\xff\xd9")  # the device decoder refuses it
    (root / "bomb.png").write_bytes(bomb())
    (root / "empty.jpg").write_bytes(b"")
    (root / "mislabelled.jpg").write_bytes(b"%PDF-1.4 not an image\n")
    good = (root / "gray.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    return root


GOOD = {"gray.png", "palette.png", "cmyk.jpg", "deep16.png", "alpha.png", "rotated.jpg",
        "big_rotated.jpg", "gray.jpg", "progressive.jpg"}  # fmt: skip
BAD = ["bomb.png", "empty.jpg", "mislabelled.jpg", "noscan.jpg", "truncated.jpg", "truncated.png"]


def pillow_reasons(root) -> dict[str, str]:
    """Why the Pillow path refuses each bad file: every decode path must say the same."""
    reasons = {}
    for name in BAD:
        with pytest.raises(BadImage) as refused:
            decode((root / name).read_bytes(), Preprocess().max_pixels, Preprocess().resize)
        reasons[name] = str(refused.value)
    return reasons


@pytest.mark.parametrize("decode", DECODES, ids=lambda d: "+".join(map(str, d.values())))
def test_every_mode_is_indexed_and_broken_files_are_recorded(odd_images, tmp_path, decode):
    out = tmp_path / "out"
    cfg = IndexConfig(
        model="tiny_models:tiny", data=str(odd_images), layers=("conv2", "fc"), out=str(out),
        k=20, max_bad_fraction=0.5, shard_size=4, **decode,
    )  # fmt: skip
    manifest = index(cfg, Progress(quiet=True))
    errors = pd.read_parquet(out / "errors.parquet").set_index("image_id")["error"]
    assert sorted(errors.index) == BAD
    assert "decompression bomb" in errors["bomb.png"] and errors["empty.jpg"] == "empty file"
    assert errors.to_dict() == pillow_reasons(odd_images)  # word for word, on every path
    images = pd.read_parquet(out / "images.parquet").set_index("image_id")
    assert (images.loc["rotated.jpg", "height"], images.loc["rotated.jpg", "width"]) == (300, 200)
    assert tuple(images.loc["big_rotated.jpg", ["height", "width"]]) == (1100, 1300)  # original
    top = pd.read_parquet(out / "index")
    assert set(top.image_id) == GOOD
    # k (20) is larger than the 9 good images: every unit lists each of them once
    assert top.groupby(["layer", "unit"]).size().eq(len(GOOD)).all()
    counts = {"images": len(GOOD) + len(BAD), "indexed": len(GOOD), "bad": len(BAD)}
    assert manifest["counts"] == {**manifest["counts"], **counts}
    assert manifest["environment"]["decodes"] == [decode["decode"]]


def test_more_workers_than_cpus_still_finishes(odd_images, tmp_path):
    """3 workers on a 2-CPU instance: the pool shrinks to what fits instead of waiting forever."""
    cfg = IndexConfig(
        model="tiny_models:tiny", data=str(odd_images), layers=("fc",), out=str(tmp_path / "o"),
        workers=3, shard_size=2, max_bad_fraction=0.5,
    )  # fmt: skip
    assert index(cfg, Progress(quiet=True))["counts"]["indexed"] == len(GOOD)


def test_output_holding_another_run_is_refused(odd_images, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(odd_images, tmp_path / "data")
    base = ["index", "--model", "tiny_models:tiny", "--data", str(tmp_path / "data"), "--out",
            str(out), "--max-bad-fraction", "0.5"]  # fmt: skip
    assert main([*base, "--layers", "fc"]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main([*base, "--layers", "conv2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a different run (layers differ)" in err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_foreign_output_folder_is_refused(odd_images, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.tex").write_text("precious")
    argv = ["index", "--model", "tiny_models:tiny", "--layers", "fc", "--data", str(odd_images),
            "--out", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    assert "not empty and holds no ninebest run" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["thesis.tex"]
