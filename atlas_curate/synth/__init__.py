"""Synthetic ATLAS releases with known ground truth (a product feature: try the tool, test pipelines)."""

from .bids import LAYOUTS, MASK_PLACES, plan_bids
from .release import FAULT_KINDS, FLAVOURS, default_truth_dir, plan_release, synthesize

__all__ = ["FAULT_KINDS", "FLAVOURS", "LAYOUTS", "MASK_PLACES", "default_truth_dir", "plan_bids", "plan_release",
           "synthesize"]
