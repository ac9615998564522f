"""The side-by-side benchmark harness (issue 9): `python -m benchmarks.run`. Runs from the
repository root; it is not part of the installed `meshagent` package."""
