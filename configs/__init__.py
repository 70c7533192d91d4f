"""configs/ is installed as the package `headrace.configs`, so the embedded default config
(default.yaml) ships inside Headrace wherever it is installed."""
