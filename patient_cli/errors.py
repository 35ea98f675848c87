"""Errors raised by the service layer, each carrying the exit code the CLI ends with.

PatientRecordsError (1: unexpected internal error)
├── UsageError (2: bad input; nothing was stored)
│   └── TargetExists (2: refusing to overwrite a file)
├── BatchIncomplete (3: a batch finished but some items failed)
├── NotFound (4: no such record)
├── ConfigError (5: key, key file or database settings are missing or invalid)
├── DatabaseUnavailable (6: cannot connect, or the connection was lost)
└── DecryptionFailed (7: wrong key, or data that fails its integrity check)
    └── IntegrityFailed (7: verify or audit --verify found damaged data)

Messages never contain record contents, key material or passwords: callers pass
only ids, usernames, paths and counts into them.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERRUPTED = 130


class PatientRecordsError(Exception):
    """Base class: an error the CLI reports as one line and a documented exit code."""

    exit_code: int = 1
    code: str = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(PatientRecordsError):
    """The input is invalid (blank username, missing file, invalid UTF-8, ...)."""

    exit_code = 2
    code = "usage_error"


class TargetExists(UsageError):
    """The output file already exists and --force was not given."""

    code = "target_exists"


class BatchIncomplete(PatientRecordsError):
    """A batch command finished, but some of its items failed."""

    exit_code = 3
    code = "batch_incomplete"


class NotFound(PatientRecordsError):
    """The requested record does not exist."""

    exit_code = 4
    code = "not_found"


class ConfigError(PatientRecordsError):
    """The key or database configuration is missing, invalid or unsafe."""

    exit_code = 5
    code = "config_error"


class DatabaseUnavailable(PatientRecordsError):
    """The database cannot be reached, or the connection was lost mid-command."""

    exit_code = 6
    code = "database_unavailable"


class DecryptionFailed(PatientRecordsError):
    """Stored data cannot be decrypted with the configured keys, or was tampered with."""

    exit_code = 7
    code = "decryption_failed"


class IntegrityFailed(DecryptionFailed):
    """A verification found damaged, missing or reordered data."""

    code = "integrity_failed"


ALL_ERRORS: tuple[type[PatientRecordsError], ...] = (
    PatientRecordsError,
    UsageError,
    TargetExists,
    BatchIncomplete,
    NotFound,
    ConfigError,
    DatabaseUnavailable,
    DecryptionFailed,
    IntegrityFailed,
)
