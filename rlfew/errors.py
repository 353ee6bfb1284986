"""User-facing errors. The CLI turns a UsageError into a one-line message and exit code 2."""


class UsageError(Exception):
    """Bad input from the user (config, paths, names). The message must name the offending thing."""


class ConfigError(UsageError):
    """A config key or value is wrong; the message names the key and what is allowed."""


class ModelLoadError(UsageError):
    """A model source could not be resolved or loaded."""


class CheckpointError(UsageError):
    """A checkpoint is missing, truncated or corrupted."""


class RewardError(RuntimeError):
    """A reward raised, returned NaN/inf or the wrong shape; names the reward and the prompts."""
