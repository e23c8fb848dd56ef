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


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, like Ctrl-C's KeyboardInterrupt: the same clean-up runs
    (Lightning's shutdown, `finally` blocks, the study stopping its workers) and the CLI exits 143."""


def terminate_on_sigterm() -> None:
    """From now on SIGTERM raises Terminated in this process's main thread. Without it a study ignored
    SIGTERM while Lightning ran a step: Lightning's handler only sets a flag, which its loops check
    between training batches (not in validation, nor in the hooks where a step's analyses run), and
    which is forgotten when the step's trainer returns. Lightning calls this handler after its own."""
    import signal

    def terminated(signum: int, frame: object) -> None:
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminated)
