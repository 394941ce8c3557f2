import sys

from gconv_compile.cli import main

sys.exit(main())
