"""Figures from measurements: medians, min-max, per-round ratios; Markdown and JSON."""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess

from .arms import LABELS, PGFAST_ARMS
from .scenarios import SCENARIOS, runs_on

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


_PREFIX = re.compile(r"^\S+ \S+ \S+ \[\d+\] (?:\S+\(\d+\) |\[local\] )?")
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
        self.pgfast_arms = [a for a in arms if a in PGFAST_ARMS]
        self.others = [a for a in arms if a not in PGFAST_ARMS]

    def add(self, m) -> None:
        self.measurements.append(m)

    def ran(self, scenario: str, arm: str) -> bool:
        """Whether the scenario is one the arm runs (SCENARIO_ARMS), in this run's selection."""
        return arm in self.arms and scenario in self.scenarios and runs_on(scenario, arm)

    def _series(self, scenario: str, arm: str, attr: str) -> dict[int, float]:
        """round -> value, only from measurements that passed."""
        return {m.round: getattr(m, attr) for m in self.measurements
                if m.scenario == scenario and m.arm == arm and m.ok and getattr(m, attr) is not None}

    def _ratios(self, scenario: str, num: str, den: str, attr: str) -> list[float]:
        """Per-round ratios num / den, only where both arms ran the scenario in that round."""
        if not (self.ran(scenario, num) and self.ran(scenario, den)):
            return []
        a, b = self._series(scenario, num, attr), self._series(scenario, den, attr)
        return [a[r] / b[r] for r in sorted(a) if r in b and b[r]]

    def _median(self, scenario: str, arm: str, attr: str) -> float | None:
        vals = list(self._series(scenario, arm, attr).values())
        return statistics.median(vals) if vals else None

    def _failed(self, scenario: str, arm: str) -> int:
        return sum(1 for m in self.measurements if m.scenario == scenario and m.arm == arm and not m.ok)

    def figures(self) -> dict:
        out = {}
        for s in self.scenarios:
            entry = {}
            for arm in self.arms:
                if not self.ran(s, arm):
                    continue
                vals = list(self._series(s, arm, "value").values())
                cpu = list(self._series(s, arm, "cpu_per_unit").values())
                front = list(self._series(s, arm, "front_cpu_per_unit").values())
                entry[arm] = {
                    "median": statistics.median(vals) if vals else None,
                    "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                    "values": vals,
                    "cpu_per_unit_median": statistics.median(cpu) if cpu else None,
                    "cpu_per_unit_values": cpu,
                    "front_cpu_per_unit_median": statistics.median(front) if front else None,
                    "front_cpu_per_unit_values": front,
                    "failed_runs": self._failed(s, arm),
                }
            for p in self.pgfast_arms:
                for other in self.others:
                    if not (self.ran(s, p) and self.ran(s, other)):
                        continue
                    r = self._ratios(s, p, other, "value")
                    c = self._ratios(s, p, other, "cpu_per_unit")
                    f = self._ratios(s, p, other, "front_cpu_per_unit")
                    entry[f"{p}/{other}"] = {"ratios": r, "median": statistics.median(r) if r else None,
                                             "cpu_ratios": c, "cpu_median": statistics.median(c) if c else None,
                                             "front_cpu_ratios": f,
                                             "front_cpu_median": statistics.median(f) if f else None}
            out[s] = entry
        return out

    # -------------------------------------------------------------- Markdown

    def _figure_table(self, attr: str, unit_of, title_of, arms: list[str]) -> list[str]:
        """Scenario rows × arm columns; "–" where the arm does not run the scenario; arm columns that
        would be all "–" are left out."""
        arms = [a for a in arms if any(self._cell(s, a, attr, unit_of(s)) != "–" for s in self.scenarios)]
        if not arms:
            return []
        head = ["scenario"] + [LABELS[a] for a in arms]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s in self.scenarios:
            row = [title_of(s)] + [self._cell(s, a, attr, unit_of(s)) for a in arms]
            lines.append("| " + " | ".join(row) + " |")
        return lines

    def _cell(self, s: str, a: str, attr: str, unit: str) -> str:
        if not self.ran(s, a):
            return "–"
        bad = self._failed(s, a)
        return _spread(list(self._series(s, a, attr).values()), unit) + (f" **{bad} failed**" if bad else "")

    def _ratio_table(self, attr: str, others: list[str], title_of) -> list[str]:
        """Rows: scenario × pgfast arm that ran it; columns: "/ other arm", those with any ratio."""
        rows = [(s, p) for s in self.scenarios for p in self.pgfast_arms if self.ran(s, p)]
        cols = [o for o in others if any(self._ratios(s, p, o, attr) for s, p in rows)]
        rows = [(s, p) for s, p in rows if any(self._ratios(s, p, o, attr) for o in cols)]
        if not cols or not rows:
            return []
        head = ["scenario", "pgfast arm"] + [f"pgfast* / {LABELS[o]}" for o in cols]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s, p in rows:
            row = [title_of(s), LABELS[p]]
            row += [_ratio(self._ratios(s, p, o, attr)) if self.ran(s, o) else "–" for o in cols]
            lines.append("| " + " | ".join(row) + " |")
        return lines

    def markdown(self) -> str:
        lines: list[str] = []

        def section(text: str, table: list[str], ratio_text: str, ratios: list[str]) -> None:
            if not table:
                return
            lines.extend([text, ""] + table + [""])
            if ratios:
                lines.extend([ratio_text, ""] + ratios + [""])

        def title(s):
            return SCENARIOS[s].title

        section("Throughput: median over rounds (min–max); \"–\": the scenario does not run on that arm "
                "(bench/scenarios.py SCENARIO_ARMS).",
                self._figure_table("value", lambda s: SCENARIOS[s].unit,
                                   lambda s: f"{title(s)} ({SCENARIOS[s].unit})", self.arms),
                "Throughput ratios, pgfast arm / other arm: medians of per-round ratios (min–max), "
                "only where both ran the scenario; higher is better.",
                self._ratio_table("value", self.others, title))
        section("Server-side CPU seconds per 1,000 transactions (a–c, f, g; a: per 1,000 connections) or per GB "
                "(d, e): the whole process trees, PostgreSQL included; median (min–max); lower is better.",
                self._figure_table("cpu_per_unit", lambda s: "cpu",
                                   lambda s: f"{title(s)} (CPU s / {SCENARIOS[s].per})", self.arms),
                "Server-side CPU ratios, pgfast arm / other arm, per round; lower is better.",
                self._ratio_table("cpu_per_unit", self.others, title))
        front_others = [o for o in self.others if o.startswith("pgbouncer")]
        section("Front CPU (the front door alone: pgfast's run process and its workers, without PostgreSQL; the "
                "pgbouncer process) seconds per 1,000 transactions (= ms per transaction; a: per 1,000 "
                "connections) or per GB, median (min–max); lower is better. Stock PostgreSQL has no front door.",
                self._figure_table("front_cpu_per_unit", lambda s: "cpu",
                                   lambda s: f"{title(s)} (front CPU s / {SCENARIOS[s].per})",
                                   [a for a in self.arms if a != "stock"]),
                "Front CPU ratios, pgfast arm / PgBouncer arm, per round; lower is better.",
                self._ratio_table("front_cpu_per_unit", front_others, title))
        lines.append("Client CPU (pgbench/psql) seconds per 1,000 transactions or per GB, median: "
                     + "; ".join(
                         f"{s}: " + (", ".join(
                             f"{a} {_fmt(self._client_per_unit(s, a), 'cpu')}" for a in self.arms
                             if self.ran(s, a) and self._client_per_unit(s, a) is not None) or "–")
                         for s in self.scenarios))
        targets = self.targets()
        if targets:
            lines.extend(["", "Targets (medians of per-round ratios, min–max; a target is met when the median "
                              "meets it):", "",
                          "| target | measured | |", "|---|---|---|"])
            for t in targets:
                lines.append(f"| {t['target']} | {t['measured']} | {t['verdict']} |")
        return "\n".join(lines)

    # -------------------------------------------------------------- targets

    TARGETS = (
        # scenario, pgfast arm, other arm, attribute, "ge"/"le", bound, wording
        ("f", "pgfast-tx", "pgbouncer-transaction", "value", "ge", 1.3, "throughput"),
        ("f", "pgfast-tx", "pgbouncer-transaction", "front_cpu_per_unit", "le", 0.7, "front CPU per transaction"),
        ("g", "pgfast-tx", "pgbouncer-transaction", "value", "ge", 1.3, "throughput"),
        ("g", "pgfast-tx", "pgbouncer-transaction", "front_cpu_per_unit", "le", 0.7, "front CPU per transaction"),
        ("b", "pgfast-metrics", "pgfast", "value", "ge", 0.97, "select-only throughput (metrics cost ≤ 3 %)"),
        ("a", "pgfast-metrics", "pgfast", "value", "ge", 0.97, "connections/s (metrics cost ≤ 3 %)"),
        ("a", "pgfast-upstream", "pgbouncer-upstream", "value", "ge", 1.3, "connections/s"),
        ("b", "pgfast-upstream", "pgbouncer-upstream", "value", "ge", 1.3, "throughput"),
        ("d", "pgfast-upstream", "pgbouncer-upstream", "value", "ge", 1.3, "bulk out"),
        ("a", "pgfast-upstream", "pgbouncer-upstream", "front_cpu_per_unit", "le", 1.0, "front CPU per connection"),
        ("b", "pgfast-upstream", "pgbouncer-upstream", "front_cpu_per_unit", "le", 1.0, "front CPU per transaction"),
        ("a", "pgfast", "pgbouncer-session", "value", "ge", 1.2, "connections/s"),
        ("a", "pgfast", "pgbouncer-transaction", "value", "ge", 1.2, "connections/s"),
        ("a", "pgfast", "pgbouncer-session", "front_cpu_per_unit", "le", 0.5, "front CPU per connection"),
        ("a", "pgfast", "pgbouncer-transaction", "front_cpu_per_unit", "le", 0.5, "front CPU per connection"),
    )

    def targets(self) -> list[dict]:
        out = []
        for s, p, o, attr, sense, bound, what in self.TARGETS:
            if not (self.ran(s, p) and self.ran(s, o)):
                continue
            r = self._ratios(s, p, o, attr)
            unit = SCENARIOS[s].unit if attr == "value" else "cpu"
            per = "" if attr == "value" else f" s / {SCENARIOS[s].per}"
            a_med, o_med = self._median(s, p, attr), self._median(s, o, attr)
            target = (f"{s}. {LABELS[p]} {what} {'≥' if sense == 'ge' else '≤'} {bound}× {LABELS[o]}'s")
            if r:
                med = statistics.median(r)
                ok = med >= bound if sense == "ge" else med <= bound
                measured = f"{_fmt(a_med, unit)} vs {_fmt(o_med, unit)}{per or ' ' + unit}: {_ratio(r)}"
                verdict = "met" if ok else "not met"
            else:
                med, measured, verdict = None, "no passed measurement pair", "not measured"
            out.append({"scenario": s, "arm": p, "other": o, "figure": attr, "sense": sense, "bound": bound,
                        "target": target, "ratios": r, "median": med, "measured": measured, "verdict": verdict})
        return out

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
            span = m.window or m.wall
            if span and m.other_cpu / span > OTHER_CPU_WARNING:
                busy.append((m.other_cpu / span, where))
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
        if meta.get("pgbouncer_version"):
            prepared = (meta.get("pgbouncer_config") or {}).get("max_prepared_statements")
            bouncer = (f"{meta['pgbouncer_version']} ({meta.get('pgbouncer_binary')}, "
                       + (f"max_prepared_statements = {prepared}" if prepared else "no max_prepared_statements")
                       + ")")
        else:
            bouncer = "PgBouncer not measured"
        pgfast_arms = "; ".join(f"{a}: {', '.join(v) or 'default configuration'}"
                                for a, v in meta.get("pgfast_arm_settings", {}).items())
        lines = [
            f"pgfast bench, {meta['date']}{' (quick run)' if meta['quick'] else ''}: "
            f"{meta['rounds']} round(s) × {meta['duration']} s per pgbench measurement, arms interleaved per round",
            f"machine: {mach['cores']} cores, {mach['cpu_model']} ({mach['cpu_flags']}), {mach['memory_gb']} GB, "
            f"Linux {mach['kernel']}",
            f"{meta['postgres_version']}; {bouncer}; pgfast {meta['pgfast_version']} at {meta['git']} "
            f"(workers auto = {meta.get('pgfast_default_workers', '?')}; {pgfast_arms}); "
            f"certificate {meta['certificate']}; TLS: " + self._tls_summary(),
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
            json.dump({"meta": self.meta, "figures": self.figures(), "targets": self.targets(), "notes": self.notes,
                       "anomalies": self.anomalies(), "markdown": self.markdown(),
                       "measurements": [m.to_json() for m in self.measurements]}, f, indent=1)
        return path
