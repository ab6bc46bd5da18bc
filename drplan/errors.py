"""User-facing errors: one line that names the problem and the fix. The CLI exits 2 on these."""


class DrplanError(Exception):
    """An error the user can act on; str(error) is the one-line message."""
