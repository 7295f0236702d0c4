"""occ-mfd: 4D semantic occupancy forecasting on nuScenes with Mean Flow Distillation."""

__version__ = "0.1.0"
