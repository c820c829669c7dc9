"""Results: the documented shape of a cell's result.json, and writing it so a killed run never leaves half a file."""
