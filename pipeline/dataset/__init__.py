"""The dataset: listing images and containers, shard keys, reading bytes, decoding pixels."""
