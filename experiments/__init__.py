"""Flagfile-driven programs: `python -m experiments.<name> --flagfile=experiments/flags/<f>`."""
