"""loadtest stage of the toolkit."""
