"""An example third-party kdbench plugin: one objective, ``jeffreys``."""
