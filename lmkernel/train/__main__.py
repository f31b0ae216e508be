"""`python -m lmkernel.train ARGS` is `lmk train ARGS`: the form `torchrun --nproc_per_node=N` starts."""

import sys

from lmkernel.cli import app

if __name__ == "__main__":
    app(["train", *sys.argv[1:]], prog_name="python -m lmkernel.train")
