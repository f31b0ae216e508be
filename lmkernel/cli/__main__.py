"""`python -m lmkernel.cli ARGS` is `lmk ARGS`."""

from lmkernel.cli import main

if __name__ == "__main__":
    main()
