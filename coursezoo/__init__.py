"""CourseZoo: train, export and serve the PyTorch course models."""
