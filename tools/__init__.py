"""Offline tools of the repository (not part of the installed package, never imported at
run time): e.g. the recipe that regenerates the shipped image-encoder weights."""
