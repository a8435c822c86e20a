"""The `monet` console script.

It lives outside the `monet` package on purpose: `import monet` registers the model with transformers'
Auto classes (loading torch and transformers, seconds), and `monet --help` must not wait for that. With
this module imported first, `monet/__init__.py` stays light and the commands load the model only when
they need it (see `monet.cli`).
"""

import sys

from monet.cli import main

if __name__ == "__main__":
    sys.exit(main())
