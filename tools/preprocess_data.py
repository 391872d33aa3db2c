"""Tokenize text / JSONL into a Megatron-core indexed dataset (see `megatron_infini.data.preprocess`)."""

import sys

from megatron_infini.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
