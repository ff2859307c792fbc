"""overlap-map: probabilistic lesion overlap map, paper figures, dataset tables and a per-lesion report."""

from .maps import accumulate, read_scan
from .pipeline import NoScansError, OverlapResult, overlap_map, summary

__all__ = ["NoScansError", "OverlapResult", "accumulate", "overlap_map", "read_scan", "summary"]
