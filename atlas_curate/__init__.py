"""atlas-curate: curation toolkit for the ATLAS stroke-lesion MRI release."""

__version__ = "0.1.0"
