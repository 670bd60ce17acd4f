"""Errors a person must fix (bad data, missing files): the CLI prints them without a traceback."""


class UserError(Exception):
    pass


class DataError(UserError):
    """Bad data: the message names the file, and the record or feature where it can."""
