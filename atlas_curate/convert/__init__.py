"""bids-convert: read an ATLAS release as shipped and write a BIDS dataset with lesion derivatives."""

from .discover import ReleaseError, detect_flavour, discover
from .pipeline import ConversionResult, convert

__all__ = ["ConversionResult", "ReleaseError", "convert", "detect_flavour", "discover"]
