"""Test-wide settings: Hypothesis profiles. `ci` (the default) keeps the test command bounded;
`HYPOTHESIS_PROFILE=long` runs the property and fuzz tests with 50 times the examples."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", settings.default)
settings.register_profile("long", max_examples=5000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def fuzz_examples(bounded: int) -> int:
    """Examples for a fuzz test: `bounded` in the test command, 50x that in the long profile
    (a test's own max_examples overrides the profile, so fuzz tests ask here)."""
    return bounded * 50 if os.environ.get("HYPOTHESIS_PROFILE") == "long" else bounded
