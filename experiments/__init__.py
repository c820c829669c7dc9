"""Experiment files, shipped inside the package as ``kdbench.experiments`` so the tiny default is
found wherever kdbench is installed."""
