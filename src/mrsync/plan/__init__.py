"""Planning: what the source holds (manifest) and what each target lacks."""
