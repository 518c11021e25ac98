"""Numeric kernels: the CPU's features (``cpu``), the precision policy (``precision``), the
Linear back ends (``linear``) and their operands (``packing``), the start-up probes that pick
their kernels (``probes``), and the native operators built ahead of time at install (``native``)."""
