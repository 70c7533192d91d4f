"""Example models served in-process by the embedded default config."""
