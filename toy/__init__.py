"""Toy text-to-video world: procedural clips with compositional prompts, and a detector that reads them back."""
