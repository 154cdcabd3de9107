"""Helpers the tests share, one module per concern; conftest.py keeps only the fixtures."""
