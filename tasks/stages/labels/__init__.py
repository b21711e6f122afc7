"""Stage: labels of every frame, their quality measures, and the verdict on an iteration's labels."""
