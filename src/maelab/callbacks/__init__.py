"""Training callbacks: reconstruction grids, throughput."""
