"""Reading a corpus: sources and the utterance record, audio decoding, file checks, alignments, splits."""
