"""User-facing errors. A UserError becomes one clear message and exit code 2 at the CLI."""


class UserError(Exception):
    """Bad user input (a flag, a file, a spec). `where` names the flag or file at fault."""

    def __init__(self, message: str, where: str | None = None):
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


def require(cond: bool, message: str, where: str | None = None) -> None:
    if not cond:
        raise UserError(message, where)
