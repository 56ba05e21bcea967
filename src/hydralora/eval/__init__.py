"""Evaluation: per-task accuracy (multiple choice by log-likelihood, generative by exact match)."""

from .scoring import (choice_loglikelihoods, evaluate, format_table, generate_answers,
                      normalize_answer)

__all__ = ["choice_loglikelihoods", "evaluate", "format_table", "generate_answers",
           "normalize_answer"]
