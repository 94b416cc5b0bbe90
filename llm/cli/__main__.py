"""`python -m llm.cli`: the same as the `kiln` command."""

import sys

from llm.cli.main import main

sys.exit(main())
