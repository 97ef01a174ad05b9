class UserError(Exception):
    """A problem the user can fix; the message names the fix (the CLIs exit with status 2)."""
