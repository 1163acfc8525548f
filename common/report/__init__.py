"""What a run shows a person: reproduce.sh's report.md and contact sheet (run), the toy preset's report and
results.json (toy), the colour-map demo sheet on the shipped samples (colormaps), Fig. 11's curves (curves), a
mean ± std table over seeds (seeds), model cards (card) and the static browser of synthetic folders (browse).
Imports: any package.
"""
