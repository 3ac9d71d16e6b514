"""The mechanism lab: recipes (one small model per mechanism, as data files), the study runner and its report."""

from .recipes import Recipe, load_recipe, recipe_names

__all__ = ["Recipe", "load_recipe", "recipe_names"]
