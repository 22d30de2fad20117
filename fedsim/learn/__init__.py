"""The learning: models, data and partitions, model profiles, gradients, local training, aggregation."""
