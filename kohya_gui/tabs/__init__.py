"""The GUI's tabs: one per training kind (training.py), Utilities, Jobs, and the run monitor beside them."""
