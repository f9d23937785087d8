"""Run tracking: MLflow runs, progress events, metrics tables and plots."""
