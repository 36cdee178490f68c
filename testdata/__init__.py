"""Synthetic raw datasets for tests, benchmarks and ``make demo``: not product code.

Imported from the repository root (``from testdata import datagen``); the installed
package (``prep``, ``node``, ``shared``) does not contain it.
"""
