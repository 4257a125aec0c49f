"""The paper's evidence: grids of runs over seeds with their tables, and the figures."""
