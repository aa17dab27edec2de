"""Cluster entrypoint: `python -m jobs.index --config jobs/specs/alexnet.yaml [flags]`.

A Ray job runs this on the head node with RAY_ADDRESS set, so the index uses the whole cluster.
"""

from __future__ import annotations

import sys

from pipeline.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    return cli_main(["index", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
