"""The exceptions unigemma raises for bad input: each names what is wrong and where.

Everything derives from `UnigemmaError`, so a caller (the CLI, the server) can catch
one type and show the message; no user mistake should surface as a crash deep inside.
"""


class UnigemmaError(Exception):
    """Base class of every error unigemma raises on purpose."""


class ConfigError(UnigemmaError, ValueError):
    """A model config is invalid, inconsistent or of an unknown type."""


class CheckpointError(UnigemmaError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the model."""


class InputError(UnigemmaError, ValueError):
    """A request's inputs are malformed: media, messages, sizes, token counts."""


class ContextTooLong(InputError):
    """A prompt cannot fit the context (known before any work: a server answers
    `context_length_exceeded`)."""


class NoChatTemplate(InputError):
    """A chat was asked of a model with no chat template. Not the request's fault: whoever
    loaded the model must give one (a server answers naming its --chat-template flag)."""


class QueueFull(UnigemmaError):
    """The scheduler's queue is full; the request was not taken (a server answers 429/503)."""
