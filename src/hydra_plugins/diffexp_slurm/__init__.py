"""diffexp's Hydra plugins: the SLURM launcher (launcher.py)."""
