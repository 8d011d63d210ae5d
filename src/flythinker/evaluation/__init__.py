"""Evaluation: the paper's metrics, paired statistics, the report, and the fusion diagnosis."""
