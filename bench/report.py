"""Write one benchmark's markdown section into BENCHMARKS.md, replacing its previous version."""

from __future__ import annotations

import platform
import re
from pathlib import Path

import torch

HEADER = "# Benchmarks\n\nEvery figure is measured by a script in `bench/`; the command is given with it.\n"


def environment() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}"
    )


def write_section(path: str | Path, name: str, body: str) -> None:
    """Replace the section between `<!-- name -->` markers (append it if missing)."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    block = f"<!-- {name} -->\n{body.strip()}\n<!-- /{name} -->"
    pattern = re.compile(rf"<!-- {re.escape(name)} -->.*?<!-- /{re.escape(name)} -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else f"{text}\n{block}\n"
    path.write_text(text)
