"""Helpers shared by the test suite (importable as `support.*`: pytest puts tests/ on sys.path
through the root conftest). One home each: running a command, hostile payloads, small arrays."""
