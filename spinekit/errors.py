"""Errors that mean "the user's input is wrong" (shown as one sentence, no traceback)."""


class InputError(ValueError):
    """Bad input: the message is one sentence naming the input and the problem."""


class MissingDependencyError(RuntimeError):
    """An optional tool or package is not installed; the message says how to get it."""
