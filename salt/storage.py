"""How a target store keeps the teacher's latents: one typed value for extraction, the store,
the benchmark and the planner.

Adding a storage format touches this module (the allowed values, how zarr writes it, how many
bytes the planner expects) and its test, tests/test_storage_format.py; docs/design.md says so.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

StoredDtype = Literal["float32", "float16"]
Codec = Literal["none", "zstd", "blosc"]
DTYPES = typing.get_args(StoredDtype)
CODECS = typing.get_args(Codec)
VALUE_BITS = {"float32": 32, "float16": 16}
EXPONENT_BITS = {"float32": 8, "float16": 5}
MANTISSA_BITS = {"float32": 23, "float16": 10}


@dataclass(frozen=True, kw_only=True)
class StorageFormat:
    """dtype of the stored values; keepbits > 0 bit-rounds the mantissa to that many bits
    (numcodecs BitRound, lossy); codec is a lossless compressor applied after it."""

    dtype: StoredDtype = "float16"
    keepbits: int = 0
    codec: Codec = "none"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if self.codec not in CODECS:
            raise ValueError(f"codec={self.codec!r}: expected one of {', '.join(CODECS)}")
        if not 0 <= self.keepbits < MANTISSA_BITS[self.dtype]:
            raise ValueError(
                f"keepbits={self.keepbits}: expected 0 (off) to {MANTISSA_BITS[self.dtype] - 1} for {self.dtype}"
            )

    @classmethod
    def of(cls, extract_cfg) -> StorageFormat:
        """The format an ExtractConfig asks for (its dtype, keepbits and codec fields)."""
        return cls(dtype=extract_cfg.dtype, keepbits=extract_cfg.keepbits, codec=extract_cfg.codec)

    def overrides(self) -> list[str]:
        """The config overrides that select this format."""
        return [f"extract.dtype={self.dtype}", f"extract.keepbits={self.keepbits}", f"extract.codec={self.codec}"]

    def zarr_codecs(self) -> dict:
        """Keyword arguments of zarr.create_array that write this format."""
        from zarr.codecs import BloscCodec, ZstdCodec
        from zarr.codecs.numcodecs import BitRound

        filters = [BitRound(keepbits=self.keepbits)] if self.keepbits else None
        compressors = {
            "none": None,
            "zstd": [ZstdCodec(level=3)],
            "blosc": [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle")],
        }[self.codec]
        return {"filters": filters, "compressors": compressors}

    def value_bytes(self, compression_ratio: float | None = None) -> float:
        """Bytes one stored value takes on disk, for the planner. Without a measured
        compression_ratio: bit-rounding under a codec can at best drop the zeroed mantissa bits
        (sign + exponent + keepbits remain); a codec alone or bit-rounding alone is counted as
        saving nothing. Measure a store (make bench) and pass its ratio for a real figure."""
        raw = VALUE_BITS[self.dtype] / 8
        if compression_ratio is None:
            kept = 1 + EXPONENT_BITS[self.dtype] + self.keepbits
            compression_ratio = VALUE_BITS[self.dtype] / kept if self.keepbits and self.codec != "none" else 1.0
        return raw / compression_ratio

    def describe(self) -> dict:
        return {"dtype": self.dtype, "keepbits": self.keepbits, "codec": self.codec, "chunk": "one sample", "zarr_shard": "one source shard"}

    def name(self) -> str:
        """Short label, e.g. float16+br5+blosc."""
        return "+".join([self.dtype, *([f"br{self.keepbits}"] if self.keepbits else []), *([self.codec] if self.codec != "none" else [])])
