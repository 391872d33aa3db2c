"""`python -m megatron_infini <command> [args]`: the same as the `megatron-infini` console script."""

import sys

from megatron_infini.cli import main

if __name__ == "__main__":
    sys.exit(main())
