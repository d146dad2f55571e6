"""FLIP data -> Lightning module -> adapter bundle (python -m training.fit ...)."""
