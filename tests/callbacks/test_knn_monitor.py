"""The k-NN monitor's weighted voting."""

import torch


def test_knn_voting_finds_clusters_and_weights_close_neighbours():
    from maelab.callbacks.knn_monitor import knn_accuracy

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 5
    train_labels = torch.arange(400) % 4
    train = centres[train_labels] + torch.randn(400, 16, generator=g)
    query_labels = torch.arange(100) % 4
    query = centres[query_labels] + torch.randn(100, 16, generator=g)
    assert knn_accuracy(train, train_labels, query, query_labels, num_classes=4, chunk=7) == 1.0
    shuffled = train_labels[torch.randperm(400, generator=g)]
    assert knn_accuracy(train, shuffled, query, query_labels, num_classes=4) < 0.5  # chance 0.25
    # one exact neighbour of class 1 outvotes 19 far ones of class 0 at temperature 0.07
    bank = torch.cat([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]).repeat(19, 1)])
    labels = torch.tensor([1] + [0] * 19)
    assert knn_accuracy(bank, labels, torch.tensor([[1.0, 0.2]]), torch.tensor([1]), num_classes=2) == 1.0
