"""Byte units: one definition for every module that reports or budgets memory in GiB."""

GIB = 2**30
