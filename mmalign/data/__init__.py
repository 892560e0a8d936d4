"""Data: pair datasets (manifest, Pick-a-Pic), decoders, the latent/embedding cache."""

from mmalign.data.images import DataError

__all__ = ["DataError", "PairRecord", "load_pairs"]


def __getattr__(name: str):
    """``PairRecord`` and ``load_pairs`` on first use: their module imports torch, which the command line's
    parser (and its one-line errors) should not wait for."""
    if name in ("PairRecord", "load_pairs"):
        from mmalign.data import pairs

        return getattr(pairs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
