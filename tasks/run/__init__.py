"""The run framework: config and its sections, stage keys, the run layout, the stage skeleton, the plan, records."""
