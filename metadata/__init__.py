"""Metadata mapping tables read at run time: installed as the package ``atlas_curate.data.metadata`` and read
with ``importlib.resources``."""
