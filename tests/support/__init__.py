"""Helpers shared by the tests: real broker and CLI processes on loopback."""
