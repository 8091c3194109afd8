"""Bytes <-> tensors: shards, video decoding, the target store, the extraction job, loaders."""
