"""User-facing error types.

Why: a mistake in a job config or a checkpoint path must reach the user as one line that says what to change,
not as a traceback from deep inside DeepSpeed or Ray. Everything a user can fix raises a subclass of
`LongtrainError`; the CLI catches it once, prints the message and exits with code 2.
"""


class LongtrainError(Exception):
    """A problem the user can fix; the message is one line naming the key or file, the value and the fix."""


class ConfigError(LongtrainError):
    """The job configuration is invalid (unknown key, wrong type, inconsistent values)."""


class CheckpointError(LongtrainError):
    """A checkpoint cannot be found, is incomplete, or does not match the job."""


class ProfileError(LongtrainError):
    """A hardware profile file is missing or malformed."""
