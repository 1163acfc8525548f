"""Datasets and the data contract between stages (docs/design.md): one Sample type (sample), readers of ADE20K,
COCO panoptic, the toy world and synthetic folders (datasets), JSONL manifests (manifest), sample ids as file
names (ids), compact indexes of large folders (index), the default paths that chain the stages (paths), real
subsets (subset), and exports for `datasets` and `webdataset` (export). Imports: runtime, masks.
"""
