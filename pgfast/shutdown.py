"""PostgreSQL's three shutdown modes, the signals that ask for them (as pg_ctl sends them
to a postmaster) and what each one says.

smart      SIGTERM  refuse new sessions (57P03), wait for the open ones to end
fast       SIGINT   end every session now with 57P01
immediate  SIGQUIT  drop everything; PostgreSQL recovers at the next start

A request can only make a shutdown under way more urgent, never less.
"""
from __future__ import annotations

import enum
import signal


class Mode(enum.IntEnum):
    SMART = 1
    FAST = 2
    IMMEDIATE = 3

    @property
    def signal(self) -> int:
        return _SIGNALS[self]

    @classmethod
    def for_signal(cls, signum: int) -> "Mode":
        return next(mode for mode, number in _SIGNALS.items() if number == signum)

    @classmethod
    def named(cls, name: str) -> "Mode":
        """pg_ctl's -m argument: s[mart], f[ast] or i[mmediate]."""
        for mode in cls:
            if name and mode.name.lower().startswith(name.lower()):
                return mode
        raise ValueError(f'unrecognized shutdown mode "{name}"')

    @property
    def request_line(self) -> str:
        return f"received {self.name.lower()} shutdown request"


_SIGNALS = {Mode.SMART: signal.SIGTERM, Mode.FAST: signal.SIGINT, Mode.IMMEDIATE: signal.SIGQUIT}
SIGNALS = frozenset(_SIGNALS.values())

# what PostgreSQL's backends say to their clients
SHUTTING_DOWN = ("57P03", "the database system is shutting down")
FAST_MESSAGE = ("57P01", "terminating connection due to administrator command")
IMMEDIATE_MESSAGE = ("57P01", "terminating connection due to immediate shutdown command")
POSTMASTER_GONE = ("57P01", "terminating connection due to unexpected postmaster exit")
