"""Errors that name what is wrong: the file, the record, the field.

Everything a user can get wrong (config, annotations, videos) raises a subclass of ``MukvError`` with a
message meant to be read as is; the CLI prints it without a traceback.
"""

from __future__ import annotations


class MukvError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(MukvError):
    """An invalid configuration value, raised before any model loads."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(f"config field '{field}': {message}")


class DataError(MukvError):
    """A malformed annotation file or record."""

    def __init__(self, path: str, message: str, record: str | int | None = None, field: str | None = None):
        self.path, self.record, self.field = str(path), record, field
        where = str(path)
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")


class VideoError(MukvError):
    """A video that is missing, unreadable, truncated or of the wrong shape."""

    def __init__(self, path: str, message: str) -> None:
        self.path = str(path)
        super().__init__(f"video {path}: {message}")
