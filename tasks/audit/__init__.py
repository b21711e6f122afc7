"""Reading a run back: `inspect`, `diff`, `verify`, and each iteration's report."""
