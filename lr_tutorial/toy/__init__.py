"""ShapeWorld: the toy world, its oracle, and the training of the toy models."""
