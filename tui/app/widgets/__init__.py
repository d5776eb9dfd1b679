"""One widget per file. Widgets draw and post messages; they never call a model."""
