"""What the two generators share (§3.2, appendix A.4): SDXL's conditioning (sdxl), the EDM sampler (sampler), the
trainers' data, optimiser and loop pieces (training), their validation on held-out captions (validation), and the
VAE round trip of colour maps (vae_roundtrip, A.7). Imports: runtime, masks, data.
"""
