"""Data: pair datasets (manifest, Pick-a-Pic), decoders, the latent/embedding cache."""

from mmalign.data.images import DataError
from mmalign.data.pairs import PairRecord, load_pairs

__all__ = ["DataError", "PairRecord", "load_pairs"]
