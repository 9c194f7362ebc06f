"""Evaluation beyond the training loop: the val loss of a checkpoint on a whole split."""
