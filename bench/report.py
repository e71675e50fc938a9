"""Figures from measurements: medians, min-max, per-round ratios; Markdown and JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess

from .arms import LABELS
from .scenarios import SCENARIOS

OTHER_CPU_WARNING = 0.10    # other processes busy more than 10% of one core during a measurement


def machine_info() -> dict:
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as f:
            mem_kb = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kb = 0
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    flags = " ".join(x for x in ("aes", "vaes", "avx2", "avx512f", "sha_ni") if x in present)
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu_model": model, "cpu_flags": flags, "memory_gb": round(mem_kb / 1024**2, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def git_state(repo: str) -> str:
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "pgfast"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return head + (" + uncommitted changes in pgfast/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "tps":
        return f"{value:,.0f}"
    if unit == "MB/s":
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _spread(values: list[float], unit: str) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return _fmt(med, unit)
    return f"{_fmt(med, unit)} ({_fmt(min(values), unit)}–{_fmt(max(values), unit)})"


def _ratio(values: list[float]) -> str:
    if not values:
        return "–"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.2f}×"
    return f"{med:.2f}× ({min(values):.2f}–{max(values):.2f})"


_PREFIX = re.compile(r"^\S+ \S+ \S+ \[\d+\] ")
_NUMBERS = re.compile(r"\d+")


def summarise_log(path: str, pattern: re.Pattern) -> list[str]:
    """Distinct suspicious messages of a whole server log, with counts (numbers masked)."""
    counts: dict[str, int] = {}
    try:
        with open(path, errors="replace") as f:
            for line in f:
                if pattern.search(line):
                    key = _NUMBERS.sub("N", _PREFIX.sub("", line.strip()))[:200]
                    counts[key] = counts.get(key, 0) + 1
    except OSError:
        return []
    return [f"{n} × {msg}" for msg, n in sorted(counts.items(), key=lambda kv: -kv[1])]


class Results:
    def __init__(self, arms: list[str], scenarios: list[str], meta: dict):
        self.arms = arms
        self.scenarios = scenarios
        self.meta = meta
        self.measurements = []          # Measurement objects
        self.notes: list[str] = []

    def add(self, m) -> None:
        self.measurements.append(m)

    def _series(self, scenario: str, arm: str, attr: str) -> dict[int, float]:
        """round -> value, only from measurements that passed."""
        return {m.round: getattr(m, attr) for m in self.measurements
                if m.scenario == scenario and m.arm == arm and m.ok and getattr(m, attr) is not None}

    def _ratios(self, scenario: str, num: str, den: str, attr: str) -> list[float]:
        a, b = self._series(scenario, num, attr), self._series(scenario, den, attr)
        return [a[r] / b[r] for r in sorted(a) if r in b and b[r]]

    def figures(self) -> dict:
        out = {}
        for s in self.scenarios:
            entry = {}
            for arm in self.arms:
                ms = [m for m in self.measurements if m.scenario == s and m.arm == arm]
                vals = list(self._series(s, arm, "value").values())
                cpu = list(self._series(s, arm, "cpu_per_unit").values())
                entry[arm] = {
                    "median": statistics.median(vals) if vals else None,
                    "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                    "values": vals,
                    "cpu_per_unit_median": statistics.median(cpu) if cpu else None,
                    "cpu_per_unit_values": cpu,
                    "failed_runs": sum(1 for m in ms if not m.ok),
                }
            if "pgfast" in self.arms:
                for other in self.arms:
                    if other == "pgfast":
                        continue
                    r = self._ratios(s, "pgfast", other, "value")
                    c = self._ratios(s, "pgfast", other, "cpu_per_unit")
                    entry[f"pgfast/{other}"] = {"ratios": r, "median": statistics.median(r) if r else None,
                                                "cpu_ratios": c,
                                                "cpu_median": statistics.median(c) if c else None}
            out[s] = entry
        return out

    def markdown(self) -> str:
        arms = self.arms
        others = [a for a in arms if a != "pgfast"] if "pgfast" in arms else []
        lines = []
        head = ["scenario"] + [LABELS[a] for a in arms] + [f"pgfast / {LABELS[o]}" for o in others]
        lines.append("Throughput: median over rounds (min–max); ratios are medians of per-round ratios (min–max).")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for s in self.scenarios:
            sc = SCENARIOS[s]
            row = [f"{sc.title} ({sc.unit})"]
            for a in arms:
                cell = _spread(list(self._series(s, a, "value").values()), sc.unit)
                bad = sum(1 for m in self.measurements if m.scenario == s and m.arm == a and not m.ok)
                row.append(cell + (f" **{bad} failed**" if bad else ""))
            for o in others:
                row.append(_ratio(self._ratios(s, "pgfast", o, "value")))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append("Server-side CPU seconds per 1,000 transactions (a–c) or per GB (d–e), median (min–max); "
                     "lower is better; ratios pgfast / other, per round.")
        lines.append("")
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for s in self.scenarios:
            sc = SCENARIOS[s]
            row = [f"{sc.title} (CPU s / {sc.per})"]
            for a in arms:
                row.append(_spread(list(self._series(s, a, "cpu_per_unit").values()), "cpu"))
            for o in others:
                row.append(_ratio(self._ratios(s, "pgfast", o, "cpu_per_unit")))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        lines.append("Client CPU (pgbench/psql) seconds per 1,000 transactions or per GB, median: "
                     + "; ".join(
                         f"{s}: " + ", ".join(
                             f"{a} {_fmt(self._client_per_unit(s, a), 'cpu')}" for a in arms)
                         for s in self.scenarios))
        return "\n".join(lines)

    def _client_per_unit(self, s: str, a: str) -> float | None:
        per = 1000.0 if SCENARIOS[s].per == "1k tx" else 1e9
        vals = [m.client_cpu / (m.work / per) for m in self.measurements
                if m.scenario == s and m.arm == a and m.ok and m.work]
        return statistics.median(vals) if vals else None

    def anomalies(self) -> list[str]:
        found = []
        busy = []
        for m in self.measurements:
            where = f"round {m.round} {m.arm} {m.scenario}"
            for e in m.errors:
                found.append(f"{where}: {e}")
            for line in m.log_lines[:10]:
                found.append(f"{where}: log: {line}")
            if m.wall and m.other_cpu / m.wall > OTHER_CPU_WARNING:
                busy.append((m.other_cpu / m.wall, where))
        if busy:
            shares = sorted(b for b, _ in busy)
            found.append(f"the machine was not otherwise idle: in {len(busy)} of {len(self.measurements)} "
                         f"measurements, CPU outside the arm and its client exceeded "
                         f"{OTHER_CPU_WARNING:.0%} of a core (median {statistics.median(shares):.0%}, "
                         f"max {shares[-1]:.0%}: {max(busy)[1]}); see other_cpu in the JSON")
        return found

    def header(self) -> str:
        meta = self.meta
        mach = meta["machine"]
        lines = [
            f"pgfast bench, {meta['date']}{' (quick run)' if meta['quick'] else ''}: "
            f"{meta['rounds']} round(s) × {meta['duration']} s per pgbench measurement, arms interleaved per round",
            f"machine: {mach['cores']} cores, {mach['cpu_model']} ({mach['cpu_flags']}), {mach['memory_gb']} GB, "
            f"Linux {mach['kernel']}",
            f"{meta['postgres_version']}; {meta.get('pgbouncer_version') or 'PgBouncer not measured'}; "
            f"pgfast {meta['pgfast_version']} at {meta['git']}; certificate {meta['certificate']}; "
            "TLS: " + self._tls_summary(),
        ]
        return "\n".join(lines)

    def _tls_summary(self) -> str:
        tls = self.meta.get("tls", {})
        if len(set(tls.values())) == 1:
            return f"{next(iter(tls.values()))} (every arm)"
        return "; ".join(f"{k}: {v}" for k, v in tls.items())

    def write_json(self, directory: str) -> str:
        os.makedirs(directory, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        path = os.path.join(directory, f"bench-{stamp}{'-quick' if self.meta['quick'] else ''}.json")
        with open(path, "w") as f:
            json.dump({"meta": self.meta, "figures": self.figures(), "notes": self.notes,
                       "anomalies": self.anomalies(), "markdown": self.markdown(),
                       "measurements": [m.to_json() for m in self.measurements]}, f, indent=1)
        return path
