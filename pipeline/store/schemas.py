"""Versioned Arrow schemas from `schemas/*.vN.json`: the contract with pandas users.

Each JSON file names its table, its version, and each field's name, Arrow type, nullability and
meaning. Writers call `conform(table, name)` before writing: it checks column names and types
(casting only where lossless, e.g. int64 to int32 fits) and stamps the schema's name and version
into the Parquet metadata, so a reader can tell which contract a file follows.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
from pathlib import Path

import pyarrow as pa

SCHEMA_DIR = Path(str(importlib.resources.files("schemas")))  # the top-level schemas/ package
# what this code writes
VERSIONS = {
    "index": 1,
    "partial": 1,
    "images": 2,
    "errors": 1,
    "export": 2,
    "stats": 1,
    "stats_state": 1,
    "phash": 1,
    "samples": 1,
    "samples_state": 1,
}


def arrow_type(name: str) -> pa.DataType:
    """An Arrow type from its alias, with `list<T>` for lists."""
    if name.startswith("list<") and name.endswith(">"):
        return pa.list_(arrow_type(name[5:-1]))
    return pa.type_for_alias(name)


@functools.cache
def schema(name: str) -> pa.Schema:
    """The Arrow schema of table `name` at the version this code writes."""
    if name not in VERSIONS:
        raise KeyError(f"no schema {name!r}; known: {', '.join(VERSIONS)}")
    path = SCHEMA_DIR / f"{name}.v{VERSIONS[name]}.json"
    spec = json.loads(path.read_text())
    fields = [
        pa.field(
            f["name"],
            arrow_type(f["type"]),
            nullable=f["nullable"],
            metadata={"doc": f["doc"]},
        )
        for f in spec["fields"]
    ]
    meta = {"ninebest.schema": name, "ninebest.schema_version": str(spec["version"])}
    return pa.schema(fields, metadata=meta)


def conform(table: pa.Table, name: str) -> pa.Table:
    """Return `table` in schema `name`: same columns in order, safe casts, schema metadata."""
    target = schema(name)
    if table.column_names != target.names:
        raise ValueError(
            f"{name} table has columns {table.column_names}, schema v{VERSIONS[name]} "
            f"expects {target.names}"
        )
    for field in target:
        if not field.nullable and table[field.name].null_count:
            raise ValueError(f"{name} table has nulls in non-nullable column {field.name!r}")
    return table.cast(target, safe=True)


def empty(name: str) -> pa.Table:
    """A table with no rows in schema `name`."""
    return schema(name).empty_table()
