"""Cython extensions: the only code that moves bulk bytes."""
