"""Model-size x token-budget sweeps and the scaling-law fit of their results."""
