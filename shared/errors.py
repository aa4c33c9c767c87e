"""Exceptions a handler raises to tell the runtime what kind of failure it met."""


class Rejected(Exception):
    """Bad input: the message can never succeed as it is. Dead-lettered at once with the reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
