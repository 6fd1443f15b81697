"""Helpers shared by the tests of one package (tests/<package>/)."""
