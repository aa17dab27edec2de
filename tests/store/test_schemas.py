"""schemas/*.json: every table's contract loads, is documented, and is enforced on write."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.store.schemas import SCHEMA_DIR, VERSIONS, conform, empty, schema

ROOT = Path(__file__).resolve().parents[2]


def test_every_schema_file_is_complete_and_documented():
    assert SCHEMA_DIR == ROOT / "schemas"
    for name, version in VERSIONS.items():
        spec = json.loads((SCHEMA_DIR / f"{name}.v{version}.json").read_text())
        assert spec["name"] == name and spec["version"] == version and spec["doc"]
        assert all(f["doc"] for f in spec["fields"])
        assert schema(name).names == [f["name"] for f in spec["fields"]]
        assert schema(name).metadata[b"ninebest.schema_version"] == str(version).encode()


def test_index_columns_are_the_documented_contract():
    s = schema("index")
    assert s.names == ["layer", "unit", "rank", "activation", "image_id", "image_hash", "y", "x"]
    assert s.field("activation").type == pa.float32() and s.field("layer").type == pa.string()


def test_conform_casts_safely_and_rejects_wrong_tables():
    table = pa.table({"image_id": ["a"], "uri": ["/a"], "error": ["boom"]})
    assert conform(table, "errors").schema.equals(schema("errors"), check_metadata=True)
    with pytest.raises(ValueError, match="expects"):
        conform(table.select(["uri", "image_id", "error"]), "errors")
    with pytest.raises(ValueError, match="nulls in non-nullable column 'image_id'"):
        conform(pa.table({"image_id": [None], "uri": ["/a"], "error": ["x"]}), "errors")
    too_big = empty("partial").to_pydict() | {"rank": [70000]}
    with pytest.raises(pa.ArrowInvalid):
        row = {k: [v[0] if v else 0] for k, v in too_big.items()}
        row.update(layer=["l"], image_id=["i"], image_hash=["h"], rank=[70000])
        conform(pa.table(row), "partial")
    with pytest.raises(KeyError, match="known: index"):
        schema("nope")
