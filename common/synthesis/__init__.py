"""MaskSyn and ImgSyn (§3.3): jobs, ids and seeds of the samples to draw, loading Text2Mask and Mask2Img, sampling
with the EDM sampler, and writing a synthetic folder (synth). Imports: runtime, masks, data, diffusion.
"""
