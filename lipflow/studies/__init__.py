"""Studies: experiments that train their own models outside the run grid (apart from the checkpoint
evaluations in ``lipflow.evaluation``). ``image_mlp``: the digits-MLP robustness comparison."""
