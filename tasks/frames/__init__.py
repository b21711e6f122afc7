"""Where frames sit and what computes them: the chunk grid, feature sources, the features store, labelling."""
