"""exporter stage of the toolkit."""
