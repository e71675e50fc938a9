"""Where PostgreSQL's programs are: pgfast.postgres_bin, else `pg_config --bindir`,
else the newest /usr/lib/postgresql/*/bin (Debian and Ubuntu's layout)."""
import glob
import os
import re
import shutil
import subprocess

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


def find_bindir(configured: str | None = None) -> str:
    if configured:
        if _has_server(configured):
            return configured
        raise StartupError(f'pgfast.postgres_bin "{configured}" does not contain an executable "postgres"')
    searched = []
    bindir = _pg_config_bindir()
    if bindir:
        searched.append(f"{bindir} (pg_config --bindir)")
        if _has_server(bindir):
            return bindir
    else:
        searched.append("pg_config (not on PATH)")
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    for candidate in candidates:
        if _has_server(candidate):
            return candidate
    searched.append("/usr/lib/postgresql/*/bin" + (f" ({', '.join(candidates)})" if candidates else " (none)"))
    raise StartupError(
        "could not find the PostgreSQL server programs",
        detail="Searched: " + "; ".join(searched) + ".",
        hint="Install PostgreSQL, or set pgfast.postgres_bin to the directory that holds \"postgres\".",
    )
