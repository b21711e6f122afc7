"""The pipeline's work, grouped by lifecycle; each group imports only the groups before it:

    corpus    reading a corpus: sources, audio, file checks, alignments, validation splits
    run       the run framework: config, keys, layout, the stage skeleton, the plan, records
    frames    where frames sit and what computes them: the chunk grid, feature sources, labelling
    stages    the stages as peers (intake, features, kmeans, labels, train, profile)
    products  what a user takes out of a run: the bundle, export, fairseq labels, units
    audit     reading a run back: inspect, diff, verify, the report

tests/test_structure.py holds the code to this order.
"""
