"""Test-suite root: pytest puts this folder on sys.path, so every test imports the shared
helpers of tests/support as `support.<module>`."""
