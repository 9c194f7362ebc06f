"""Evaluation beyond the training loop: the val loss of a checkpoint on a whole split (loss),
continuation log-likelihoods (scoring), a HellaSwag-format benchmark (multiple_choice) and
EleutherAI's lm-evaluation-harness (harness, an optional extra)."""
