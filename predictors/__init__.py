"""Accuracy predictors trained on measured (architecture, fitness) pairs; see the predictor issue."""
