"""User-facing errors. A UserError becomes one clear message and exit code 2 at the CLI."""


class UserError(Exception):
    """Bad user input (a flag, a file, a spec). `where` names the flag or file at fault."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def require(cond: bool, message: str, where: str | None = None) -> None:
    if not cond:
        raise UserError(message, where)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGINT stopped a stage. A KeyboardInterrupt (a BaseException), so that no
    `except Exception` on the way swallows it and what handles Ctrl-C handles SIGTERM alike. `what` says where the stage stopped and how to
    continue ("interrupted at step 40; rerun with --resume to continue"); the CLI prints it in
    one line and exits 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, what: str = ""):
        self.signum, self.what = signum, what
        super().__init__(what or f"interrupted by signal {signum}")
