"""What a run shows a person: reproduce.sh's report.md and contact sheet (run), the toy preset's report and
results.json (toy), and the colour-map demo sheet on the shipped samples (colormaps). Imports: any package.
"""
