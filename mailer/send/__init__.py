"""A real send: the run, the resume rule, the delivery child, the signing pool, the journal."""
