"""Evaluation and privacy: the lm-eval driver (`harness`), the offline task set (`tasks/`) and
membership-inference attacks (`mia`). Nothing heavy is imported here."""
