"""Evaluation and reporting: metrics, scoring over seed sets, the regression gate, figures and the run report."""
