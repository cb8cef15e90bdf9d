"""Small pieces every stage uses: atomic output directories, provenance, the CLI error boundary."""
