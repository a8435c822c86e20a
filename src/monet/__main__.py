"""`python -m monet ...` is the `monet` command; torchrun launches it as `torchrun ... -m monet train ...`."""

import sys

from monet.cli import main

sys.exit(main())
