"""In-context learning study: linear transformers learn preconditioned gradient descent.

Reproduces Ahn, Cheng, Daneshmand & Sra 2023 (arXiv 2306.00297): data (``data``), the
L-layer attention model (``model``), closed forms and optimal GD/PGD baselines (``theory``),
training (``train``), the pipeline jobs and tables (``study``), figures (``plots``) and the
command line (``python -m lipflow.studies.icl``).
"""
