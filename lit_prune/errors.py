"""User-facing errors: one line naming the field, the value and what is allowed."""


class LitPruneError(ValueError):
    """Bad input from the user; the CLI prints it as one line and exits with status 2."""


def invalid(field: str, value: object, allowed: str) -> LitPruneError:
    """Build the standard message: `field=value is invalid: expected allowed`."""
    return LitPruneError(f"{field}={value!r} is invalid: expected {allowed}")
