"""Templates read at run time (QC thresholds, template registry, HTML pages): installed as the package
``atlas_curate.data.templates`` and read with ``importlib.resources``."""
