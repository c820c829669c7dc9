"""The grid as a graph of stages: collect it from an experiment, plan it, run it, cache what it builds."""
