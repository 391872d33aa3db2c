"""How the trainer tells launchers what happened. Launchers (slurm/, launch/) rely on these.

- EXIT_OK: the planned steps are done.
- EXIT_REQUEUE: a stop was requested (SIGUSR1/SIGTERM to a trainer rank, the stop file, or
  `checkpoint.exit_duration_minutes`); a checkpoint was saved; run again to continue. Also
  for a signal before the first step (importing, building, loading): nothing was written,
  the last checkpoint stays the latest.
- EXIT_NONFINITE: `train.max_consecutive_skips` steps in a row had a non-finite loss or
  gradient (none was applied); the run diverged: do not requeue as is.
- EXIT_HANG: no step completed within `train.hang_timeout_s` (stacks and the rank that stopped
  reporting are in the log, RUN_DIR/HANG says the same); worth a requeue (a bad node, a stuck
  filesystem), capped by the launcher.
- any other non-zero code: a failure; do not requeue blindly.

The stop file lets launchers that cannot signal the trainer ranks (torchrun's agent kills its
workers on SIGTERM) ask for a clean stop: `touch RUN_DIR/STOP`. The trainer removes it once
it has saved, so a requeued job does not stop again at once.
"""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG_ERROR = 2
EXIT_NONFINITE = 3
EXIT_HANG = 4
EXIT_REQUEUE = 75  # EX_TEMPFAIL in sysexits.h: "try again later"
STOP_FILE = "STOP"
#: Written by rank 0 next to the checkpoint before exiting with EXIT_REQUEUE: torchrun reports
#: any failed worker as exit 1, so launchers read this file rather than the exit code.
REQUEUE_FILE = "REQUEUE"
#: Written by rank 0's hang watchdog before exiting with EXIT_HANG.
HANG_FILE = "HANG"
