"""serving stage of the toolkit."""
