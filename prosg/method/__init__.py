"""ProSG itself: the synthetic-gradient generator, training and evaluation."""
