"""Reading a corpus: the source formats, the utterance record and the columnar manifest, audio decoding
(files, shard byte ranges, Parquet rows, spans), probing on workers, cutting long recordings,
alignments, splits."""
