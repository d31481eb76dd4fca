"""The ServerApp: strategy from the run config, rounds, evaluation, results folder."""
