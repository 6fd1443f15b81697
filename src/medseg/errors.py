"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class MedsegError(Exception):
    """A problem with the user's input (a file, a folder, an option), described in one line."""


class DatasetError(MedsegError):
    """A dataset folder that cannot be used as it is."""
