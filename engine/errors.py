"""Errors that the engine raises for problems a user can fix (bad files, bad settings)."""


class SpindleError(Exception):
    """Base class for errors reported to the user as one clear message, never a deep stack trace."""


class ModelLoadError(SpindleError):
    """A model file or directory is missing, corrupt, truncated or of an unsupported kind."""


class ConfigError(SpindleError, ValueError):
    """A configuration value is invalid."""


class WorkerGroupError(SpindleError):
    """A tensor-parallel rank died, hung past the collective timeout or failed mid-step: the ranks can no longer run
    steps together, so the engine stops serving."""
