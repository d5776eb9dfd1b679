"""Errors a user can cause and fix. The CLI and TUI turn each into one clear line."""


class GptchatError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class UsageError(GptchatError):
    """A bad option value or combination (exit code 2 in the CLI)."""


class CheckpointError(GptchatError):
    """A checkpoint is missing, not GPT-2, truncated or corrupt."""


class ModelNotFound(CheckpointError):
    """A model name or path resolves to nothing on this machine and cannot be fetched."""


class TokenizerError(GptchatError):
    """A tokenizer file is unreadable or malformed, missing, or does not fit the model."""


class ContextOverflow(GptchatError):
    """The prompt alone does not fit the model's context window."""


class DeviceError(GptchatError):
    """The requested device or dtype is not available here."""


class TemplateError(GptchatError):
    """A prompt template or examples file is invalid, or a variable is missing."""


class DataError(GptchatError):
    """Training data is missing, empty, binary, not UTF-8, or malformed."""


class TrainError(GptchatError):
    """A training run cannot start or continue (unknown run, does not fit in memory, ...)."""


class BatchInputError(GptchatError):
    """A batch input file, or one of its rows, is invalid (the message names the line)."""


class BatchOutputError(GptchatError):
    """A batch output file cannot be resumed or merged as it is."""


class PathError(GptchatError):
    """A gptchat folder cannot be created or used (GPTCHAT_HOME is a file, no permission, disk full)."""


class OutputError(GptchatError):
    """An output file cannot be written now (another process is writing it, no permission, disk full)."""
