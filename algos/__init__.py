"""Training methods, one file each (imported as `rlfew.algos.<name>`); see rlfew/method.py for the contract."""
