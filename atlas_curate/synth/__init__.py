"""Synthetic ATLAS releases with known ground truth (a product feature: try the tool, test pipelines)."""

from .release import FAULT_KINDS, FLAVOURS, default_truth_dir, plan_release, synthesize

__all__ = ["FAULT_KINDS", "FLAVOURS", "default_truth_dir", "plan_release", "synthesize"]
