"""Stage 3: an Optuna study of head settings, chosen on validation, the best scored once on test."""
