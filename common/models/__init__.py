"""Models without trained weights, with the real architectures: tiny random ones that every test and `make smoke`
runs on (tiny), and real-size ones built from the shipped configs for the GPU benchmark (realsize).
Imports: runtime, masks, data, diffusion, seg.
"""
