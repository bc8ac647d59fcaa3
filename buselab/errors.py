"""Errors a user can cause. The CLI prints their message as one line and exits."""


class UserError(Exception):
    """Something the user can fix: the message says what is wrong and what to do."""
