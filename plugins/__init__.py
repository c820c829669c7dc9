"""kdbench's built-in plugins, installed as the ``kdbench_plugins`` package.

Each module registers through the ``kdbench.plugins`` entry-point group in pyproject.toml, exactly
as a third-party package would.
"""
