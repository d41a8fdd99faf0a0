"""Errors a user can read. The CLI prints their message and exits non-zero, without a traceback."""


class KilnError(Exception):
    """Base of every error that is the input's fault, not kiln's."""


class ConversionError(KilnError):
    """A checkpoint (Hugging Face folder or GGUF file) cannot be read or converted."""


class BuildError(KilnError):
    """An engine cannot be built, refit or written as asked."""


class EngineError(KilnError):
    """An engine directory is missing, malformed, or does not match what is asked of it."""


class RequestError(KilnError):
    """A request can never be served as asked (too long, bad parameters)."""


class PromptTooLong(RequestError):
    """A prompt longer than the engine can take (told apart so APIs can say ``context_length_exceeded``)."""
