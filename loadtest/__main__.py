"""`python -m loadtest`: a thin entry point; the work is in loadtest.cli."""
from loadtest.cli import main

raise SystemExit(main())
