"""Errors the data layer raises for problems the user can fix (shown without a traceback)."""


class DataError(ValueError):
  """A raw file is malformed; the message names the file, the line or field, and the expectation."""


class DataUnavailableError(DataError):
  """A raw file is missing and cannot be downloaded; the message says where to put it."""
