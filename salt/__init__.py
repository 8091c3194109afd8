"""SALT: frozen-teacher video self-supervised learning (models, masking, losses, training)."""
