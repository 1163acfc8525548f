"""The toy world: a procedural segmentation dataset small enough to learn on 2 CPU cores (world) and the
SDXL-architecture base trained on it, SDXL-base's stand-in (base). Imports: every package above but report.
"""
