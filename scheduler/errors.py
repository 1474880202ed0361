"""Errors raised by the scheduler package."""


class RequestRejected(ValueError):
    """A request that can never be served under the current limits, so retrying cannot help (unlike a full queue)."""
