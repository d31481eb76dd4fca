"""The server's own error type, importable without Flower or torch (the CLI catches it)."""


class RunFailed(RuntimeError):
    """A run that stopped, or ended, without training: the message says why."""
