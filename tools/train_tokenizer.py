"""Train a sentencepiece tokenizer (see `megatron_infini.data.train_tokenizer`)."""

import sys

from megatron_infini.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
