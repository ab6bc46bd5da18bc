"""User-facing errors: one line that names the problem and the fix. The CLI exits 2 on these."""


class DrplanError(Exception):
    """An error the user can act on; str(error) is the one-line message."""


def first_line(exc: BaseException) -> str:
    """An exception as one line for a report or message: its first line, or its type when it has no text."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class AccessDenied(DrplanError):
    """AWS refused a call for lack of permission; the line names the IAM action and the resource."""
