"""The project's exception family.

Every error a user can cause is one of these, and its message says what failed, the offending value and the
fix, on one line. The CLI turns them into a red line and exit code 1; anything else is a bug and shows a
traceback.
"""


class NanoVLMError(Exception):
    """Base class of every error the user can cause and fix."""


class ConfigError(NanoVLMError, ValueError):
    """An impossible or inconsistent configuration, caught before any work starts."""


class CheckpointError(NanoVLMError):
    """A checkpoint that is missing files, has unknown or missing keys, or wrong shapes."""


class ImageError(NanoVLMError):
    """An image that cannot be read: missing, corrupt, truncated, a decompression bomb, not an image."""


class DataError(NanoVLMError):
    """A dataset or sample that cannot be used: unknown format, missing fields, nothing to supervise."""


class GenerationError(NanoVLMError):
    """Bad generation input: empty prompt, prompt longer than the context."""


class TrainingError(NanoVLMError):
    """Training cannot go on: repeated non-finite losses, a resume directory that does not match."""


class HubError(NanoVLMError):
    """Publishing failed: no token, bad repo id."""
