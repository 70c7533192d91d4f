"""The Open Inference Protocol: generated stubs (from proto/, by `make proto`), datatypes, and
translation between protocol messages and Headrace's own types."""
