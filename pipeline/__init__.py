"""ninebest: distributed nine-best activation indexing for ConvNets (Zeiler & Fergus, 2013).

`pipeline.open(url)` opens a finished index for notebooks (see `pipeline.api`). It is imported on
first use (a module `__getattr__`), so `import pipeline`, which every CLI start runs, stays free of
torch, Ray and pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers and editors see; at run time `__getattr__` imports it
    from pipeline.api import Run, UnitView
    from pipeline.api import open_run as open

__version__ = "0.1.0"
__all__ = ["Run", "UnitView", "__version__", "open"]
LAZY = {"open": "open_run", "Run": "Run", "UnitView": "UnitView"}  # name here -> in pipeline.api


def __getattr__(name: str) -> Any:
    if name in LAZY:
        from pipeline import api

        return getattr(api, LAZY[name])
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *LAZY])
