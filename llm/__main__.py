"""`python -m llm <verb>`: the same as the `llm` command."""

from llm.cli import main

raise SystemExit(main())
