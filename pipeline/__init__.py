"""Bytes <-> tensors: shards, video decoding, the target store, the extraction job, loaders.

The modules here are the data/store layer; the top-level package experiments/ holds the drivers
built on them (stage runs from files, sweeps, probe, selection, replication, benchmarks)."""
