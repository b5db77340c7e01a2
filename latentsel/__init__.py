"""latentsel: the hierarchical latent selection model of reasoning traces."""
from latentsel.world import Route, Skill, World, default_world

__version__ = "0.1.0"

__all__ = ["Route", "Skill", "World", "default_world", "__version__"]
