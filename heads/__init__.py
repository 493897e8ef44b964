"""Stage 2: multi-label heads on the cached features, chosen on validation, scored once on test."""
