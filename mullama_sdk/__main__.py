import sys

from mullama_sdk.cli import main

sys.exit(main())
