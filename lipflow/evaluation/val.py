"""``val``: loss (nats/token), next-token accuracy and perplexity exp(loss) over the val split's
consecutive context windows (``TokenShards.sequential_windows``: every target but the last
(tokens − 1) mod context), and the number of targets scored."""

from __future__ import annotations

from lipflow.evaluation import EVALUATIONS, EvalContext
from lipflow.metrics import evaluate_windows


@EVALUATIONS.register("val")
def evaluate(ctx: EvalContext) -> list[dict]:
    result = evaluate_windows(ctx.model, ctx.val_windows, int(ctx.cfg["batch_size"]), ctx.device, ctx.report)
    return [{"metric": name, "value": value} for name, value in result.items()]
