"""User-facing errors: one line naming the field, the value and what is allowed."""


class LitPruneError(ValueError):
    """Bad input from the user; the CLI prints it as one line and exits with status 2."""


def invalid(field: str, value: object, allowed: str) -> LitPruneError:
    """Build the standard message: `field=value is invalid: expected allowed`."""
    return LitPruneError(f"{field}={value!r} is invalid: expected {allowed}")


def first_line(err: BaseException) -> str:
    """The first line of an error's message ("" for none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def described(err: BaseException) -> str:
    """`TypeName: first line of the message`: a library's error inside one of ours."""
    return f"{type(err).__name__}: {first_line(err)}"
