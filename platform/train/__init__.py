"""Training: the loop and losses, schedules, evaluation metrics, Ray Train wiring."""
