"""Lovász-softmax against a brute-force Lovász extension (threshold form) and hand cases."""
import pytest
import torch

from occ_mfd.models.lovasz import lovasz_softmax, lovasz_softmax_flat


def jaccard_set_loss(mistakes: torch.Tensor, fg: torch.Tensor) -> float:
    """Δ_J(M) = |M| / |F ∪ M| for mistake set M (bool), foreground F (bool); Δ(∅) = 0."""
    union = (mistakes | fg).sum().item()
    return mistakes.sum().item() / union if union else 0.0


def lovasz_extension_bruteforce(m: torch.Tensor, fg: torch.Tensor) -> float:
    """f̄(m) = ∫_0^1 Δ({i : m_i ≥ θ}) dθ, evaluated exactly on the sorted distinct values (Lovász 1983)."""
    vals = sorted(set(m.tolist()), reverse=True) + [0.0]
    total = 0.0
    for v, v_next in zip(vals[:-1], vals[1:]):
        total += (v - v_next) * jaccard_set_loss(m >= v, fg)
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_bruteforce_extension(seed):
    g = torch.Generator().manual_seed(seed)
    N, K = 9, 4
    probs = torch.randn(N, K, generator=g).softmax(-1).double()
    labels = torch.randint(0, K - 1, (N,), generator=g)  # class K-1 absent → excluded ("present")
    expected = []
    for c in range(K):
        fg = labels == c
        if fg.any():
            expected.append(lovasz_extension_bruteforce((fg.double() - probs[:, c]).abs(), fg))
    got = lovasz_softmax_flat(probs, labels).item()
    assert got == pytest.approx(sum(expected) / len(expected), abs=1e-10)


def test_perfect_prediction_is_zero_and_hand_cases():
    labels = torch.tensor([0, 1, 2, 1])
    assert lovasz_softmax_flat(torch.nn.functional.one_hot(labels, 3).float(), labels).item() == 0.0
    # Two voxels, labels [0, 1], p = 0.5 everywhere: each class has errors (0.5, 0.5), Δ(both) = 2/2 → 0.5.
    p = torch.full((2, 2), 0.5)
    assert lovasz_softmax_flat(p, torch.tensor([0, 1])).item() == pytest.approx(0.5)
    # Labels [0, 0], p0 = (1, 0.5): errors (0, 0.5) → 0.5 · Δ({2}) = 0.5 · 1/2; class 1 absent.
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert lovasz_softmax_flat(p, torch.tensor([0, 0])).item() == pytest.approx(0.25)
    # All wrong, one-hot: IoU 0 → loss 1 for each present class.
    p = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert lovasz_softmax_flat(p, torch.tensor([0, 1])).item() == pytest.approx(1.0)


def test_ignore_index_equals_dropping_voxels():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 3, 4, generator=g)
    labels = torch.randint(0, 5, (2, 3, 4), generator=g)
    labels[0, 1] = 255
    keep = labels != 255
    ref = lovasz_softmax_flat(logits.softmax(1).movedim(1, -1)[keep], labels[keep])
    assert lovasz_softmax(logits, labels, ignore_index=255).item() == pytest.approx(ref.item(), abs=1e-7)
