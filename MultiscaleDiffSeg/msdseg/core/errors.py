"""Errors that front ends show to people as one line, without a traceback."""


class InputError(ValueError):
    """A problem with an input image or argument, stated in one line that names the problem."""


class Cancelled(RuntimeError):
    """The user (or a signal) cancelled a long-running job; nothing half-written is left."""
