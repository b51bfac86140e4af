"""Temperature scaling (Guo et al. 2017): probabilities that mean what they say.

A network trained with cross-entropy on a few hundred images is usually over-confident: of
the val images it labels with probability 0.95, fewer than 95% are right. One scalar T,
fitted at the end of training by minimising the val negative log-likelihood of softmax(z / T),
fixes most of it without changing a single prediction (argmax is unchanged). T is stored in
best/model.json and applied by predict.py; results.json reports the expected calibration
error (ECE, 15 equal-width bins) before and after, measured on the val images T was fitted
on (optimistic: no other labelled images are available).
"""

import torch
import torch.nn.functional as F


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100, low: float = 0.1,
                    high: float = 10.0) -> float:
    """The T minimising mean NLL of softmax(logits / T) (LBFGS on log T), kept in
    [low, high]: when val is perfectly separated the optimum runs off towards T -> 0, which
    would claim certainty from a few hundred images."""
    logits, labels = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return min(max(float(log_t.detach().exp()), low), high)


def expected_calibration_error(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
                               bins: int = 15) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by bin size."""
    probs = (torch.as_tensor(logits, dtype=torch.float64) / temperature).softmax(-1)
    conf, pred = probs.max(-1)
    correct = (pred == torch.as_tensor(labels)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = torch.zeros((), dtype=torch.float64)
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (conf > low) & (conf <= high)
        if inside.any():
            ece += inside.double().mean() * (correct[inside].mean() - conf[inside].mean()).abs()
    return float(ece)
