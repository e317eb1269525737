"""Run every test: ``python3 -m tests`` (from the repository root).

Tests run side by side in worker processes (``-j N``; by default four per core,
since most of a test's time is spent waiting on its emulator, bot and scripts:
on two cores, four per core keeps both busy, more only wait for them).
Each test gets its own emulator, ports and folders, so any two can run at once.
The slowest tests start first (their times from the last run, kept in
``tests/.durations.json``), and the run ends with the slowest named and the
summary line ``N passed, N failed, N skipped`` alone on the last line.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
import traceback
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DURATIONS = os.path.join(ROOT, "tests", ".durations.json")


class _Result(unittest.TestResult):
    """One test's outcome, with its output kept aside (shown only when it failed)."""

    def __init__(self):
        super().__init__()
        self.buffer = True
        self.outcome = "passed"
        self.detail = ""

    def _failed(self, kind: str, test, err) -> None:
        self.outcome = kind
        self.detail = self._exc_info_to_string(err, test)

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._failed("failed", test, err)

    def addError(self, test, err):
        super().addError(test, err)
        self._failed("error", test, err)

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self.outcome, self.detail = "skipped", reason

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self.outcome, self.detail = "failed", "unexpected success"

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._failed("failed" if issubclass(err[0], test.failureException) else "error", subtest, err)


def _run_one(test_id: str) -> dict:
    """In a worker: run one test by its id; what happened, how long it took."""
    started = time.monotonic()
    result = _Result()
    try:
        unittest.defaultTestLoader.loadTestsFromName(test_id).run(result)
    except Exception:  # noqa: BLE001 - a broken test module is a failed test, not a dead worker
        result.outcome, result.detail = "error", traceback.format_exc()
    return {"id": test_id, "outcome": result.outcome, "detail": result.detail,
            "seconds": time.monotonic() - started}


def _worker_init() -> None:
    # a worker's stdin is not the terminal's; ^C is handled by the parent, which ends the pool
    sys.stdin = io.StringIO()


def _ids(suite) -> list:
    out: list = []
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            out.extend(_ids(item))
        elif type(item).__name__ in ("_FailedTest", "ModuleImportFailure", "_ErrorHolder"):
            out.append(item)          # a module that did not import: reported as an error below
        else:
            out.append(item.id())
    return out


def _load_durations() -> dict:
    try:
        with open(DURATIONS, encoding="utf-8") as fh:
            got = json.load(fh)
        return got if isinstance(got, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_durations(durations: dict) -> None:
    try:
        tmp = DURATIONS + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(durations, fh, indent=0, sort_keys=True)
        os.replace(tmp, DURATIONS)
    except OSError:
        pass      # a read-only checkout: the next run just orders by guesswork


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", dest="patterns", action="append", default=[],
                        help="only tests whose name contains this substring")
    parser.add_argument("-j", dest="jobs", type=int, default=0, metavar="N",
                        help="tests run side by side (default: 4 per core; 1 runs them one by one)")
    parser.add_argument("-q", "--quiet", action="store_true", help="dots instead of test names")
    parser.add_argument("-f", "--failfast", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    if args.jobs < 0:
        parser.error("-j: expected a positive number")
    os.chdir(ROOT)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = ["*%s*" % p for p in args.patterns]
    found = _ids(loader.discover(os.path.join(ROOT, "tests"), top_level_dir=ROOT))
    broken = [t for t in found if not isinstance(t, str)]
    ids = [t for t in found if isinstance(t, str)]
    known = _load_durations()
    ids.sort(key=lambda t: -known.get(t, 30.0))      # unknown ones count as slow: they start early
    jobs = args.jobs or 4 * (os.cpu_count() or 1)
    jobs = max(1, min(jobs, len(ids) or 1))

    started = time.monotonic()
    results: list = []
    for test in broken:           # an import error: run it here, it only reports itself
        res = _Result()
        test.run(res)
        results.append({"id": test.id(), "outcome": "error", "detail": res.detail, "seconds": 0.0})
    print("running %d tests, %d side by side" % (len(ids), jobs), flush=True)
    pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_worker_init, maxtasksperchild=None)
    interrupted = False
    try:
        for res in pool.imap_unordered(_run_one, ids, chunksize=1):
            results.append(res)
            _report(res, args.quiet)
            if args.failfast and res["outcome"] in ("failed", "error"):
                break
    except KeyboardInterrupt:
        interrupted = True
    finally:
        pool.terminate()
        pool.join()
    if args.quiet:
        print()
    wall = time.monotonic() - started

    bad = [r for r in results if r["outcome"] in ("failed", "error")]
    for r in bad:
        print("=" * 70)
        print("%s: %s" % (r["outcome"].upper(), r["id"]))
        print("-" * 70)
        print(r["detail"].rstrip())
    if not args.patterns and not bad and not interrupted and len(results) == len(ids):
        _save_durations({r["id"]: round(r["seconds"], 2) for r in results})
    busy = sum(r["seconds"] for r in results)
    print("took %.0f s (%.0f s of tests, %d side by side)" % (wall, busy, jobs))
    slow = sorted(results, key=lambda r: -r["seconds"])[:5]
    print("slowest: " + ", ".join("%s %.0f s" % (r["id"].rsplit(".", 1)[-1], r["seconds"]) for r in slow))
    counts = {k: sum(1 for r in results if r["outcome"] == k) for k in ("passed", "skipped")}
    print("%d passed, %d failed, %d skipped" % (counts["passed"], len(bad), counts["skipped"]))  # CI reads it
    if interrupted:
        return 130
    if not results:
        print("no test ran", file=sys.stderr)
        return 1
    return 1 if bad or len(results) < len(ids) + len(broken) else 0


def _report(res: dict, quiet: bool) -> None:
    mark = {"passed": ".", "skipped": "s", "failed": "F", "error": "E"}[res["outcome"]]
    if quiet:
        print(mark, end="", flush=True)
    else:
        word = {"passed": "ok", "skipped": "skipped", "failed": "FAIL", "error": "ERROR"}[res["outcome"]]
        print("%s ... %s (%.1f s)" % (res["id"], word, res["seconds"]), flush=True)


if __name__ == "__main__":
    sys.exit(main())
