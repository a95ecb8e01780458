"""`python -m service [options]`: the same as `metanet serve [options]`."""

import sys

from service.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
