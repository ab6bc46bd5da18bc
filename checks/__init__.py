"""Integrity checks of restored copies (Great Expectations suites from the plan) and source-vs-copy fingerprints."""

from checks.fingerprint import fingerprint_diff
from checks.integrity import run_integrity_checks
from checks.report import DiffReport, IntegrityReport, KeyDiff

__all__ = ["DiffReport", "IntegrityReport", "KeyDiff", "fingerprint_diff", "run_integrity_checks"]
