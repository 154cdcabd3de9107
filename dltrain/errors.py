"""The errors dltrain raises on purpose: each names its cause, and the CLI turns it into one
line on stderr and a non-zero exit, instead of a traceback."""


class DltrainError(Exception):
    """Base class: a failure that a user can act on, with a message that says how."""

    exit_code = 1


class ConfigError(DltrainError):
    """params.yaml (or an override) is invalid: unknown key, wrong type, value out of range."""

    exit_code = 2


class DownloadError(DltrainError):
    """No mirror delivered a verified copy of a file."""


class DataError(DltrainError):
    """An input data file is missing or malformed (bad IDX magic, short data, bad label)."""


class TrainingError(DltrainError):
    """Training could not start (pre-flight check) or failed."""


class CertainTrainingError(TrainingError):
    """A training failure that a retry would only repeat (a non-finite loss, a model that does
    not fit in memory): the worker records it and the run ends without Ray Train's retries."""


class ModelError(DltrainError):
    """A model file is missing, corrupt, not plain weights, or does not match its description."""


class RegistryError(DltrainError):
    """The MLflow tracking server or registry could not be used."""


class DiskFullError(DltrainError):
    """An output could not be written: the device holding it has no space left. Nothing
    partial is left behind (the atomic writers remove their temporary file)."""


class NotWritableError(DltrainError):
    """An output's directory cannot be written: read-only, not a directory, or no permission.
    Nothing is written (checked where the output is staged, before any of it)."""
