"""Preference data: the pair schema, loaders for every supported source, the vendored eval sets,
text statistics, and the controlled-poisoning plants. No torch."""
