"""Stage: the equal-k reference of an iteration's labels, and the verdict and quality gate it decides."""
