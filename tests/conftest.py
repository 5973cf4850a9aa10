"""Test-suite root. tests/ is a package, so pytest puts the repository root on sys.path and
every test imports the shared helpers as `tests.support.<module>` (ports, the small model,
certificates, scripted clients, servers); no test imports another test file."""
