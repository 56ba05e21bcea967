from hydralora.eval.harness import bundled_docs, process_results  # noqa: F401  (lm-eval's !function)
