"""`python -m serving`: a thin entry point; the work is in serving.cli."""
from serving.cli import main

raise SystemExit(main())
