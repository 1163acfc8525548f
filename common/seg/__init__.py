"""Segmentation (§3.4, §4, appendix A.3): label tables (labels), train_seg's data recipes (data), Mask2Former and
HRNet (model, hrnet, backbones), the training loop (loop), metrics (metrics) and the quality filter of synthetic
data (quality, FreeMask). Imports: runtime, masks, data.
"""
