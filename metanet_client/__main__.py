"""`python -m metanet_client tasks ls`, `... classify TASK_ID IMAGE...`: the client's commands."""

import sys

from metanet_client.cli import main

if __name__ == "__main__":
    sys.exit(main())
