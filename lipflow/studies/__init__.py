"""Studies: experiments that train their own models outside the run grid (apart from the checkpoint
evaluations in ``lipflow.evaluation``). ``icl``: in-context linear regression (Ahn et al. 2023);
``image_mlp``: the digits-MLP robustness comparison."""
