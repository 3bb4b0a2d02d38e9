"""Backends of the MulCLIP ops: one module per op and backend."""
