"""Training recipes: each family's setup functions, run by `polymodal train CONFIG.yaml [key=value ...]`.

A recipe YAML names its recipe in a top-level `recipe:` key; everything else is that recipe's
config dataclass. Recipes are declared by their families (`Family.recipes`) and all run through
`polymodal.recipes.runner` (scripts-as-functions, torchtune style, not trainer subclasses).
"""
from polymodal.recipes.runner import RecipeResult, TrainingJob, run_recipe, run_training

__all__ = ["RecipeResult", "TrainingJob", "run_recipe", "run_training"]
