"""``lipschitz_gpt_unscaled``: ``lipschitz_gpt`` with every constant branch scaling 1 (Newhouse et al. 2025).

x ← x + attn(x); x ← x + mlp(x), attention W_o·softmax(attn_scale·QKᵀ/d_head + mask)·V without ⅓: at
attn_scale = logit_scale = 1 (App. D's values) this is Modula with each ``Mul`` the identity in the
forward pass and sensitivity 1, as on the reference's
``laker-coupling`` branch (Arongil/lipschitz-transformers 5103286, "Fix: switch Mul sensitivity to 1",
2025-05-07, until the merge of 2025-05-09), whose commit 9c3c1b4 sweeps Shakespeare at w_max 2, blocks
mass 32, batch 64 and names the checkpoint ``shakespeare_muon_val_loss_1.221_lipschitz_4.079`` — the
preprint's "decay LR by 1/2 per residual layer … setting the sensitivity of Mul to 1" trick. The
released code (``lipschitz_gpt``) restored the scalars. Everything else is ``lipschitz_gpt``'s
(attn_scale and logit_scale still scale the scores and the logits, which the branch's unit ``Mul``
did not): under ``parametrization: modular`` each residual now has sensitivity 1 + s_branch
(attention 1 + 3, the MLP 1 + 1), which divides the step sizes of everything upstream, and the
certificate composes x + F(x) as 1 + L_F (bounds grow much faster with depth than through the convex
residual's (1−α) + α·L_F).
"""

from __future__ import annotations

from lipflow.model.lipschitz_gpt import LipschitzGPT
from lipflow.model.registry import MODELS


@MODELS.register("lipschitz_gpt_unscaled")
class UnscaledLipschitzGPT(LipschitzGPT):
    @staticmethod
    def block_constants(n_layers: int) -> tuple[float, float, float]:
        """(κ, β, D) = (1, 1, 1): x ← x + F(x), attention not divided."""
        return 1.0, 1.0, 1.0
