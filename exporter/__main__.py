"""`python -m exporter`: a thin entry point; the work is in exporter.cli."""
from exporter.cli import main

raise SystemExit(main())
