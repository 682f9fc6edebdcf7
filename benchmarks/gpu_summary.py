"""The one-page Markdown summary of a GPU session (benchmarks/gpu_run.sh), from the logs its stages wrote.

    python -m benchmarks.gpu_summary --logs LOG_DIR --out gpu_summary.md

LOG_DIR holds what gpu_run.sh writes: ``env.txt`` ("key: value" lines), ``stages.tsv`` (stage, status, exit
code, seconds, cap), one ``<stage>.log`` per stage, and the Markdown reports of the parity, large-tensor and
benchmark stages. Any of them may be missing (a stage skipped or killed): the summary says so and goes on.
"""

from __future__ import annotations

import argparse
import collections
import os
import re

BACKENDS = ("triton", "cuda", "cpu", "reference")
OUTCOMES = ("passed", "failed", "error", "skipped", "xfail", "xpass")
# `pytest -v` prints "tests/x.py::test[id] PASSED [ 1%]"; with xdist "[gw0] [  1%] PASSED tests/x.py::test[id]";
# the -rfE summary "FAILED tests/x.py::test[id] - message" and "ERROR tests/x.py" (a collection error).
_RESULT_AFTER = re.compile(r"^(tests/\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_RESULT_BEFORE = re.compile(r"^(?:\[gw\d+\]\s+\[\s*\d+%\]\s+)?(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\s+(tests/\S+)")
_FINAL = re.compile(r"^=+ (.* in [\d.]+s\b.*?) =+$")  # "== 3 failed, 9 passed in 1.2s ==", "== no tests ran in 4s =="
_SANITIZER_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+) error")


def read(path: str) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return None


def backend_of(nodeid: str) -> str:
    """The backend a test id is parametrized with (``-`` when none): the first of BACKENDS among its id's words."""
    params = nodeid.partition("[")[2]
    words = set(re.split(r"[^A-Za-z0-9]+", params))
    return next((b for b in BACKENDS if b in words), "-")


def pytest_outcomes(log: str) -> tuple[dict[str, str], str]:
    """(test id -> outcome, pytest's final tally line) from a ``pytest -v`` log; the last word on an id wins."""
    results: dict[str, str] = {}
    final = ""
    for line in log.splitlines():
        line = line.strip()
        m = _RESULT_AFTER.match(line)
        if m:
            results[m.group(1)] = m.group(2).lower()
            continue
        m = _RESULT_BEFORE.match(line)
        if m:
            results[m.group(2)] = m.group(1).lower()
            continue
        m = _FINAL.match(line)
        if m:
            final = m.group(1)
    return results, final


def tests_section(logs: str, stages: list[dict]) -> list[str]:
    lines = [
        "## Tests",
        "",
        "Outcomes from `pytest -v`, by the backend a test is parametrized with (`-`: not parametrized by backend;",
        "such tests use the default backend of the run: triton unless the run sets RLHF_KERNELS_BACKEND).",
        "",
        "| run | backend | " + " | ".join(OUTCOMES) + " |",
        "|---|---|" + "---:|" * len(OUTCOMES),
    ]
    failed_ids: list[str] = []
    finals = []
    for st in stages:
        if not st["name"].startswith("tests"):
            continue
        log = read(os.path.join(logs, st["name"] + ".log"))
        if log is None:
            lines.append(f"| {st['name']} | (no log: {st['status']}) |" + " |" * len(OUTCOMES))
            continue
        results, final = pytest_outcomes(log)
        finals.append(f"- {st['name']}: {final or 'no final tally (' + st['status'] + ')'}")
        table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        by_backend = st["name"] != "tests_training"  # the training layer's ids name devices, not backends
        for nodeid, outcome in results.items():
            table[backend_of(nodeid) if by_backend else "all"][outcome] += 1
            if outcome in ("failed", "error"):
                failed_ids.append(f"{st['name']}: {outcome} {nodeid}")
        for backend in sorted(table, key=lambda b: (b in ("-", "all"), b)):
            counts = table[backend]
            lines.append(f"| {st['name']} | {backend} | " + " | ".join(str(counts[o]) for o in OUTCOMES) + " |")
    lines += ["", "pytest's own tally:", ""] + (finals or ["- no test run"])
    if failed_ids:
        lines += ["", f"Failed or erroring tests ({len(failed_ids)}):", ""]
        lines += [f"- `{t}`" for t in failed_ids[:40]]
        if len(failed_ids) > 40:
            lines.append(f"- ... and {len(failed_ids) - 40} more (see the logs)")
    return lines + [""]


def sanitizer_section(logs: str, stages: list[dict]) -> list[str]:
    lines = [
        "## compute-sanitizer",
        "",
        "| tool | errors reported | workload (benchmarks/gpu_sanitize.py) | stage |",
        "|---|---:|---|---|",
    ]
    found = False
    for st in stages:
        if not st["name"].startswith("sanitize_"):
            continue
        found = True
        tool = st["name"].removeprefix("sanitize_")
        log = read(os.path.join(logs, st["name"] + ".log")) or ""
        counts = _SANITIZER_SUMMARY.findall(log)
        if counts:
            errors = str(sum(int(c) for c in counts))
        elif "not supported" in log.lower():
            errors = "device not supported by compute-sanitizer"
        elif "compute-sanitizer not found" in log:
            errors = "compute-sanitizer not found"
        else:
            errors = "no ERROR SUMMARY line"
        work = next((ln.strip() for ln in log.splitlines() if ln.startswith("SANITIZE ")), "did not finish")
        lines.append(f"| {tool} | {errors} | {work} | {st['status']} ({st['seconds']} s) |")
    if not found:
        lines.append("| - | not run | | |")
    return lines + [""]


def tables_of(report: str) -> str:
    """A report of benchmarks.common.publish or gpu_parity without its own title and environment list."""
    body = report.split("\n###", 1)
    return "###" + body[1] if len(body) == 2 else report


def included(logs: str, name: str, title: str, missing: str) -> list[str]:
    text = read(os.path.join(logs, name))
    lines = [f"## {title}", ""]
    if text is None:
        return lines + [missing, ""]
    return lines + [tables_of(text).strip().replace("\n### ", "\n#### ").replace("### ", "#### ", 1), ""]


def read_stages(logs: str) -> list[dict]:
    text = read(os.path.join(logs, "stages.tsv")) or ""
    stages = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 5:
            stages.append(dict(zip(("name", "status", "rc", "seconds", "cap"), parts)))
    return stages


def summary(logs: str) -> str:
    env = {}
    for line in (read(os.path.join(logs, "env.txt")) or "").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            env.setdefault(key.strip(), value.strip())
    stages = read_stages(logs)
    lines = [f"# GPU session: {env.get('device', 'unknown device')}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items() if k != "device"]
    total = sum(float(s["seconds"]) for s in stages if s["seconds"].replace(".", "", 1).isdigit())
    lines += [
        "",
        f"## Stages ({total:.0f} s in all)",
        "",
        "| stage | result | exit code | seconds | cap (s) |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['cap']} |" for s in stages]
    lines.append("")
    lines += tests_section(logs, stages)
    lines += included(logs, "parity.md", "Backend parity and batch invariance", "Not run (see the stage table).")
    lines += included(logs, "large.md", "N * V > 2**31", "Not run (see the stage table).")
    lines += sanitizer_section(logs, stages)
    lines += included(logs, "bench_bandwidth.md", "Bandwidth", "Not run (see the stage table).")
    lines += included(logs, "bench_heads.md", "Fused heads", "Not run (see the stage table).")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--logs", required=True, help="the directory gpu_run.sh wrote its logs to")
    p.add_argument("--out", help="write the summary here (default: print it)")
    args = p.parse_args(argv)
    text = summary(args.logs)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
