"""Launch training runs: `python -m launch submit ...` (Slurm) and `python -m launch local ...`.

One launcher: `launch.cli` checks a job against its config (launch/checks.py, launch/memory.py),
renders slurm/train.sbatch into the run directory and submits it with sbatch, or runs
torchrun on this machine. The sbatch script itself is plumbing: srun + torchrun.
"""
