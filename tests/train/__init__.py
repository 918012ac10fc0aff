"""tests/train is a package so that its conftest is imported as `train.conftest` and never shadows
tests/conftest.py."""
