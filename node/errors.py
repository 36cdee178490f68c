"""The agent's two kinds of failure, mapped to exit codes by the CLI."""


class UsageError(Exception):
    """Bad request: unknown or incompatible loader/format, unavailable loader, missing
    dataset. Exit 2, one line."""


class RunFailed(Exception):
    """The run started but failed. Exit 1, one line (a failed results row is written)."""
