"""Helpers the test modules share, one module per concept (docs/DESIGN.md section 8). None is named `test_*`, so
pytest collects none of them, and a test module imports helpers from here, never from another test module."""
