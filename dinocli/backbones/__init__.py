"""Built-in backbone plugins: reference-compatible ViTs and torchvision ResNets."""
