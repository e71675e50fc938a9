"""Which operating-system account runs PostgreSQL, and dropping to it.

PostgreSQL refuses to run as root. Started as root (containers, these machines),
pgfast reads what only root may read (the key, if root owns it), binds its TCP
ports, and then becomes the database account for good, so neither PostgreSQL nor
the code that faces the network runs with root's rights.
"""
from __future__ import annotations

import os
import pwd
from dataclasses import dataclass

from .errors import StartupError


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


def _from_pwd(entry: pwd.struct_passwd) -> Account:
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def current() -> Account:
    return _from_pwd(pwd.getpwuid(os.geteuid()))


def database_account(data_dir: str, requested: str | None) -> Account:
    """The data directory's owner when that is not root, else `requested` or postgres."""
    if os.geteuid() != 0:
        me = current()
        if requested and requested != me.name:
            raise StartupError(f'--user {requested} needs pgfast to be started as root',
                               hint=f'pgfast runs PostgreSQL as the user that starts it ("{me.name}").')
        return me
    try:
        owner = os.stat(data_dir).st_uid
    except FileNotFoundError:
        owner = 0
    if owner != 0 and not requested:
        try:
            return _from_pwd(pwd.getpwuid(owner))
        except KeyError:
            raise StartupError(f'data directory "{data_dir}" is owned by uid {owner}, which has no account')
    name = requested or "postgres"
    try:
        account = _from_pwd(pwd.getpwnam(name))
    except KeyError:
        raise StartupError(
            f'pgfast was started as root and there is no "{name}" account to run PostgreSQL as',
            hint="PostgreSQL cannot run as root. Create the account (useradd --system postgres) "
                 "or name another one with --user.")
    if account.uid == 0:
        raise StartupError(f'"{name}" is root; PostgreSQL cannot run as root', hint="Name another account with --user.")
    if owner not in (0, account.uid):
        raise StartupError(f'data directory "{data_dir}" is owned by uid {owner}, not by "{name}"')
    return account


def drop_privileges(account: Account) -> None:
    """Become `account` for good (a no-op when already running as it)."""
    if os.geteuid() == account.uid:
        return
    os.initgroups(account.name, account.gid)
    os.setgid(account.gid)
    os.setuid(account.uid)


def subprocess_user(account: Account) -> dict:
    """subprocess.run() arguments that run a child as `account` (no-op when already it)."""
    if os.geteuid() == account.uid:
        return {}
    return {"user": account.uid, "group": account.gid, "extra_groups": os.getgrouplist(account.name, account.gid)}


def check_reachable(path: str, account: Account) -> None:
    """After dropping privileges: can the account use the data directory at all?"""
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK):
        raise StartupError(f'data directory "{path}" is not accessible to user "{account.name}"',
                           hint="Check the permissions of the directory and of every directory above it.")
