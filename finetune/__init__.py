"""finetune stage of the toolkit."""
