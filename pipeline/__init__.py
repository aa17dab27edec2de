"""ninebest: distributed nine-best activation indexing for ConvNets (Zeiler & Fergus, 2013)."""

__version__ = "0.1.0"
