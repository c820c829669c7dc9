"""Training: the one loop, the sequence sources a step draws from, and sampling from the models."""
