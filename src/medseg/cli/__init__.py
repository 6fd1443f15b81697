"""Command-line interface: a thin layer over :mod:`medseg.api` (and, for the hospital
commands, :mod:`medseg.pacs` and :mod:`medseg.serve`); shared helpers in :mod:`medseg.cli.common`."""
