"""Engine layer: spec -> launch -> supervise -> outcome. No pytest import; usable on its own."""
