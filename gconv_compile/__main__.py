"""``python -m gconv_compile``: the command line."""

import sys

from gconv_compile.cli import main

if __name__ == "__main__":
    sys.exit(main())
