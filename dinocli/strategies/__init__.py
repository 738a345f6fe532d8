"""Built-in collapse-avoidance strategies."""
