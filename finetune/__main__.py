"""`python -m finetune`: a thin entry point; the work is in finetune.cli."""
from finetune.cli import main

raise SystemExit(main())
