"""Mutation check: plant each realistic bug of the mutation table and make sure a test catches it.

The table (`tests/mutations/mutations.yaml`) lists bugs we have made or could easily make: for
each, the file, an exact piece of its text (a unique substring of one or a few lines), the buggy
replacement, and the tests that must fail on it. This script copies the repository into a
temporary folder once per worker, and for each mutation: plants the bug, runs only its named
tests (`pytest -x`) with the copy first on PYTHONPATH (so the mutant, not the editable install,
is imported), puts the file back and records the outcome:

    caught    the named tests failed (pytest exit 1), or ran past --timeout
    survived  the named tests passed: they do not guard against this bug
    stale     the original text is not in the file exactly once: update the table
    error     pytest could not run the tests (a test id that no longer exists, a collection error)

It prints one line per mutation and exits 1 listing every survivor, stale entry and error. The
full suite is not run here: CI runs it first (`.ci/run`), so the named tests are known to pass on
the unmutated code; `--baseline` checks that here too.

    python tools/mutation_check.py                  # every mutation, 2 workers
    python tools/mutation_check.py --list           # the table
    python tools/mutation_check.py --only ID ...    # some mutations
"""
from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "tests" / "mutations" / "mutations.yaml"
MIN_MUTATIONS = 25
FIELDS = ("id", "area", "file", "original", "replacement", "description", "tests")
OPTIONAL_FIELDS = ("select",)  # a pytest -k expression narrowing the named tests
# What a copy leaves out: version control, caches and run outputs. Bytecode is neither copied nor
# written (PYTHONDONTWRITEBYTECODE): a .pyc of a mutant compiled in the same second as the
# restored file could otherwise be reused for it.
COPY_IGNORE = shutil.ignore_patterns(".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache",
                                     ".benchmarks", "runs", "build", "dist", ".whl", ".gl")


class TableError(ValueError):
    """A malformed mutation table (names the entry and field)."""


@dataclass(frozen=True)
class Mutation:
    """One planted bug: `original` (exactly once in `file`) becomes `replacement`; `tests` (pytest
    node ids, narrowed by the -k expression `select` when given) must fail on it."""

    id: str
    area: str
    file: str
    original: str
    replacement: str
    description: str
    tests: tuple[str, ...]
    select: str | None = None


@dataclass
class Outcome:
    """What running one mutation gave: status (see the module docstring), seconds, and detail
    (the first failing test, or why it could not run)."""

    mutation: Mutation
    status: str
    seconds: float
    detail: str = ""


def load_table(path: Path = TABLE) -> list[Mutation]:
    """The mutations of a YAML table (a list of mappings with FIELDS); raises `TableError` naming
    the entry and field that is missing or of the wrong type."""
    entries = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(entries, list):
        raise TableError(f"{path}: expected a list of mutations, got {type(entries).__name__}")
    mutations = []
    for i, entry in enumerate(entries):
        where = f"{path} entry {i} ({entry.get('id', '?') if isinstance(entry, dict) else '?'})"
        if not isinstance(entry, dict):
            raise TableError(f"{where}: expected a mapping")
        missing = [f for f in FIELDS if f not in entry]
        unknown = sorted(set(entry) - set(FIELDS) - set(OPTIONAL_FIELDS))
        if missing or unknown:
            raise TableError(f"{where}: missing fields {missing}, unknown fields {unknown}")
        for name in FIELDS[:-1] + tuple(f for f in OPTIONAL_FIELDS if f in entry):
            # An empty replacement deletes the original (a dropped line); nothing else may be empty.
            if not isinstance(entry[name], str) or not (entry[name].strip() or name == "replacement"):
                raise TableError(f"{where}: `{name}` must be a non-empty string")
        tests = entry["tests"]
        if not isinstance(tests, list) or not tests or not all(isinstance(t, str) and t for t in tests):
            raise TableError(f"{where}: `tests` must be a non-empty list of pytest node ids")
        mutations.append(Mutation(**{**entry, "tests": tuple(tests)}))
    return mutations


def mutate(text: str, mutation: Mutation) -> str:
    """`text` with the mutation planted; raises `TableError` unless the original occurs exactly once."""
    count = text.count(mutation.original)
    if count != 1:
        raise TableError(f"{mutation.id}: the original text occurs {count} times in {mutation.file} (needs exactly "
                         "one): the code changed, update the table")
    return text.replace(mutation.original, mutation.replacement)


def table_problems(mutations: list[Mutation], root: Path = ROOT) -> list[str]:
    """Everything wrong with a table against the tree at `root`, without running a test: duplicate
    ids, missing files, originals not found exactly once, no-op replacements, named test files
    or test functions that do not exist, fewer than MIN_MUTATIONS entries."""
    problems = []
    if len(mutations) < MIN_MUTATIONS:
        problems.append(f"the table holds {len(mutations)} mutations, fewer than {MIN_MUTATIONS}")
    seen: set[str] = set()
    for m in mutations:
        if m.id in seen:
            problems.append(f"{m.id}: duplicate id")
        seen.add(m.id)
        if m.original == m.replacement:
            problems.append(f"{m.id}: the replacement equals the original")
        source = root / m.file
        if not source.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
        else:
            try:
                mutate(source.read_text(encoding="utf-8"), m)
            except TableError as err:
                problems.append(str(err))
        problems += [f"{m.id}: {p}" for p in (_node_problem(root, node) for node in m.tests) if p]
    return problems


def _node_problem(root: Path, node: str) -> str | None:
    """Why a pytest node id `file[::Class]::test[params]` names nothing under `root`, else None."""
    path, *names = node.split("::")
    test_file = root / path
    if not test_file.is_file():
        return f"test file {path} does not exist"
    if names:
        name = names[-1].split("[")[0]
        if not re.search(rf"^\s*(async\s+)?def {re.escape(name)}\(", test_file.read_text(encoding="utf-8"), re.M):
            return f"{path} defines no test {name}"
    return None


def _environment(copy: Path) -> dict[str, str]:
    """The environment that makes a subprocess import the package from `copy`."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(copy), os.environ.get("PYTHONPATH")) if p)
    return env


def make_copy(parent: Path, name: str) -> Path:
    """A copy of the repository under `parent`, checked to be what a test run imports."""
    copy = parent / name
    shutil.copytree(ROOT, copy, ignore=COPY_IGNORE)
    # The editable install maps `polymodal` to the working tree; PYTHONPATH must win over it.
    imported = subprocess.run([sys.executable, "-c", "import polymodal; print(polymodal.__file__)"], cwd=copy,
                              env=_environment(copy), capture_output=True, text=True, check=True).stdout.strip()
    if Path(imported).resolve() != (copy / "polymodal" / "__init__.py").resolve():
        raise RuntimeError(f"a test run in {copy} would import polymodal from {imported}, not from the copy")
    return copy


def _pytest(copy: Path, mutation: Mutation, timeout: float) -> subprocess.CompletedProcess | None:
    """Run the mutation's tests in `copy`; None when they ran past `timeout` seconds."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *mutation.tests]
    if mutation.select:
        command += ["-k", mutation.select]
    try:
        return subprocess.run(command, cwd=copy, env=_environment(copy), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def run_mutation(copy: Path, mutation: Mutation, timeout: float) -> Outcome:
    """Plant `mutation` in `copy`, run its tests, restore the file; the outcome."""
    start = time.perf_counter()
    source = copy / mutation.file
    original = source.read_text(encoding="utf-8")
    try:
        source.write_text(mutate(original, mutation), encoding="utf-8")
    except TableError as err:
        return Outcome(mutation, "stale", 0.0, str(err))
    try:
        result = _pytest(copy, mutation, timeout)
    finally:
        source.write_text(original, encoding="utf-8")
    seconds = time.perf_counter() - start
    if result is None:
        return Outcome(mutation, "caught", seconds, f"timed out after {timeout:.0f}s")
    if result.returncode == 0:
        return Outcome(mutation, "survived", seconds, "")
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.M)
    if result.returncode == 1 and failed:
        return Outcome(mutation, "caught", seconds, failed[0])
    tail = (result.stdout + result.stderr).strip().splitlines()[-3:]
    return Outcome(mutation, "error", seconds, f"pytest exit {result.returncode}: " + " | ".join(tail))


def baseline(copy: Path, mutations: list[Mutation], timeout: float) -> str | None:
    """Run every named test on the unmutated copy; why they do not all pass, or None."""
    nodes = tuple(dict.fromkeys(node for m in mutations for node in m.tests))
    # `select` only narrows a mutation's tests; the baseline runs them whole, a superset.
    result = _pytest(copy, Mutation("baseline", "", "", "", "", "", nodes), timeout)
    if result is None:
        return f"the unmutated tests ran past {timeout:.0f}s"
    if result.returncode != 0:
        return "the unmutated tests do not pass:\n" + "\n".join((result.stdout + result.stderr).splitlines()[-15:])
    return None


def check(mutations: list[Mutation], jobs: int, timeout: float, run_baseline: bool) -> list[Outcome]:
    """Run `mutations` on `jobs` workers (one repository copy each); outcomes in table order."""
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        copies: queue.Queue[Path] = queue.Queue()
        for i in range(max(1, min(jobs, len(mutations)))):
            copies.put(make_copy(Path(tmp), f"worker{i}"))
        if run_baseline:
            problem = baseline(copies.queue[0], mutations, timeout * len(mutations))
            if problem:
                raise SystemExit(f"mutation check: {problem}")

        def work(mutation: Mutation) -> Outcome:
            copy = copies.get()
            try:
                outcome = run_mutation(copy, mutation, timeout)
            finally:
                copies.put(copy)
            print(_row(outcome), flush=True)
            return outcome

        with ThreadPoolExecutor(max_workers=copies.qsize()) as pool:
            outcomes = list(pool.map(work, mutations))
    return outcomes


def _row(outcome: Outcome) -> str:
    m = outcome.mutation
    return f"{outcome.status:<9} {outcome.seconds:6.1f}s  {m.area:<11} {m.id:<34} {outcome.detail or m.description}"


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these mutations")
    parser.add_argument("--jobs", type=int, default=2, help="parallel workers, one repository copy each (default 2)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutation before it counts as caught")
    parser.add_argument("--baseline", action="store_true", help="first check that the named tests pass unmutated")
    parser.add_argument("--table", type=Path, default=TABLE, help="the mutation table (YAML)")
    args = parser.parse_args(argv)
    mutations = load_table(args.table)
    if args.list:
        for m in mutations:
            print(f"{m.area:<11} {m.id:<34} {m.file}: {m.description}\n{'':47}tests: {' '.join(m.tests)}")
        print(f"{len(mutations)} mutations")
        return 0
    if args.only:
        unknown = sorted(set(args.only) - {m.id for m in mutations})
        if unknown:
            parser.error(f"--only: no mutation named {', '.join(unknown)}")
        mutations = [m for m in mutations if m.id in args.only]
    started = time.perf_counter()
    outcomes = check(mutations, args.jobs, args.timeout, args.baseline)
    wall = time.perf_counter() - started
    counts = {s: sum(o.status == s for o in outcomes) for s in ("caught", "survived", "stale", "error")}
    print(f"\n{len(outcomes)} mutations in {wall:.0f}s with {args.jobs} workers: "
          + ", ".join(f"{n} {s}" for s, n in counts.items()))
    bad = [o for o in outcomes if o.status != "caught"]
    for o in bad:
        print(f"  {o.status.upper()} {o.mutation.id} ({o.mutation.file}): {o.mutation.description}\n"
              f"      tests: {' '.join(o.mutation.tests)}{'  -k ' + o.mutation.select if o.mutation.select else ''}"
              + (f"\n      {o.detail}" if o.detail else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
