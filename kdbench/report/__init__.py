"""Reports: leaderboards built from result files alone."""
