"""Data files read at run time: ``templates/`` and ``metadata/`` of the source tree, installed as the
packages ``atlas_curate.data.templates`` and ``atlas_curate.data.metadata``."""
