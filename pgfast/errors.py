"""Errors that stop pgfast from starting.

Each becomes one ``FATAL:`` line on stderr (with PostgreSQL's DETAIL/HINT lines when
there are any) and exit status 1, so the wording follows PostgreSQL's where PostgreSQL
has a message for the same condition: users and their tools grep for it.
"""


class StartupError(Exception):
    def __init__(self, message: str, detail: str | None = None, hint: str | None = None,
                 context: str | None = None):
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.hint = hint
        self.context = context      # PostgreSQL's CONTEXT line: where in a file
        # the LOG lines PostgreSQL writes before this error, as (message, context): a file's
        # bad lines, each logged before the file is refused
        self.preceding: list[tuple[str, str | None]] = []


class ConfigError(StartupError):
    """postgresql.conf (or -c) holds something pgfast or PostgreSQL would refuse."""


class HbaError(StartupError):
    """pg_hba.conf or pg_ident.conf holds a line that cannot be honoured."""


class TLSSetupError(StartupError):
    """The server certificate, key, CA, CRL or TLS settings cannot be used."""


class PostgresRefused(StartupError):
    """PostgreSQL itself refused its configuration; its own lines say why."""

    def __init__(self, output: str):
        super().__init__("PostgreSQL refused its configuration")
        self.output = output


class Refused(Exception):
    """A client refused before its session starts: a FATAL ErrorResponse worded as
    PostgreSQL words it, and the real reason for the server log only (log_detail, as
    PostgreSQL's errdetail_log) apart from what the client may see (detail)."""

    def __init__(self, sqlstate: str, message: str, log_detail: str | None = None, detail: str | None = None,
                 hint: str | None = None):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.log_detail = log_detail
        self.detail = detail
        self.hint = hint


class AuthFailed(Refused):
    """pg_hba.conf or an authentication exchange said no."""


class ClientGone(Exception):
    """The client's login cannot go on and PostgreSQL says nothing more to it (its
    STATUS_EOF): the connection just closes."""
