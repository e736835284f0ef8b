"""Running experiments: checkpoints and run folders, sweeps, the report and its figures."""
