"""Run every test: ``python3 -m tests`` (from the repository root).

Options are passed to unittest's discovery, e.g. ``python3 -m tests -k poller``.
Ends with the summary line ``N passed, N failed, N skipped`` alone on the last line.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _TimedResult(unittest.TextTestResult):
    """Remembers how long each test took (the slowest are named at the end)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.durations: dict = {}
        self._started = 0.0

    def startTest(self, test):
        self._started = time.monotonic()
        super().startTest(test)

    def stopTest(self, test):
        self.durations[test.id()] = time.monotonic() - self._started
        super().stopTest(test)


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests", description=__doc__)
    parser.add_argument("-k", dest="patterns", action="append", default=[],
                        help="only tests whose name contains this substring")
    parser.add_argument("-q", "--quiet", action="store_true", help="dots instead of test names")
    parser.add_argument("-f", "--failfast", action="store_true", help="stop at the first failure")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    loader = unittest.TestLoader()
    if args.patterns:
        loader.testNamePatterns = ["*%s*" % p for p in args.patterns]
    suite = loader.discover(os.path.join(ROOT, "tests"), top_level_dir=ROOT)
    runner = unittest.TextTestRunner(verbosity=1 if args.quiet else 2, failfast=args.failfast,
                                     resultclass=_TimedResult)
    started = time.monotonic()
    result = runner.run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    skipped = len(result.skipped)
    passed = result.testsRun - failed - skipped
    print("took %.0f s" % (time.monotonic() - started))
    slow = sorted(result.durations.items(), key=lambda kv: -kv[1])[:5]
    print("slowest: " + ", ".join("%s %.0f s" % (name.rsplit(".", 1)[-1], t) for name, t in slow))
    print("%d passed, %d failed, %d skipped" % (passed, failed, skipped))   # the closing line CI reads
    if result.testsRun == 0:
        print("no test ran", file=sys.stderr)
        return 1
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main())
