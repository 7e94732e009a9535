"""The only Hydra-aware library code: one function per entry point."""
