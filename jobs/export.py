"""Cluster entrypoint: `python -m jobs.export ARGS` runs `ninebest export ARGS`.

`ninebest submit -- export ARGS` sends this to a Ray cluster; the job's driver runs on
the head with RAY_ADDRESS set, so the work uses the whole cluster.
"""

from __future__ import annotations

import sys

from pipeline.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["export", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
