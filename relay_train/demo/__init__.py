"""Fixtures, not the product: the tiny random SD3 pipeline and the demo dataset the tests and `relay demo` use."""
