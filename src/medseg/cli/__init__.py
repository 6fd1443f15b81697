"""Command-line interface: a thin layer over :mod:`medseg.api`."""
