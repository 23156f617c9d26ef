"""Training: the pipeline from configs to models, the trainer, evaluation,
the compared variants and the report."""
