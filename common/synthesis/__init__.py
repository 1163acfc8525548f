"""MaskSyn and ImgSyn (§3.3): jobs, ids and seeds of the samples to draw, loading Text2Mask and Mask2Img, sampling
with the EDM sampler, and writing a synthetic folder (synth); MaskSyn's redraw plan (redraws); the options the
generation stages share (options); what needs the whole folder once its tasks are done (finalize).
Imports: runtime, masks, data, diffusion.
"""
