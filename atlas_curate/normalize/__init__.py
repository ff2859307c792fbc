"""normalize: N4, brain-aware affine registration to MNI152NLin2009aSym, standardisation, defacing, QC."""

from .pipeline import NormalizeResult, normalize

__all__ = ["NormalizeResult", "normalize"]
