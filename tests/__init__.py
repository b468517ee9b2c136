"""Test suite (run with ``python -m pytest``)."""
