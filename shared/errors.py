"""Exceptions that tell the runtime (or the CLI) what kind of failure was met."""


class ConfigurationError(Exception):
    """A setting a worker cannot start with: `ordermill run` says so in one line and stops."""


class Rejected(Exception):
    """Bad input: the message can never succeed as it is. Dead-lettered at once with the reason."""

    def __init__(self, reason: str, *, tell_publisher: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        # False where the publisher's rejection event would mislead (its order may exist).
        self.tell_publisher = tell_publisher
