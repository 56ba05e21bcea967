"""Adapters to training and evaluation tools that live outside transformers and PEFT (optional extras)."""
