"""Numeric kernels: the precision policy and Linear back ends (``precision``) and the native
operators built ahead of time at install (``native``)."""
