"""Segmentation (§3.4, §4, appendix A.3): label tables (labels), train_seg's recipes (recipes) and data recipes
(data), which samples each iteration sees (batches), Mask2Former and HRNet (model, hrnet, backbones), the training
loop (loop) with its periodic validation (validation) and trackers (tracking), metrics (metrics) and the quality
filter of synthetic data (quality, FreeMask). Imports: runtime, masks, data.
"""
