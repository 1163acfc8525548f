"""Colour maps, the paper's subject (§3.2, appendix A.2): f_mask→color and f_color→mask, the generation and usual
palettes, and the class tables of each dataset (colormap). Imports: runtime.
"""
