"""The learning task shared by clients and the server's evaluator.

Settings, models, adapters, data, and the training and evaluation loops.

Heavy libraries (torch, transformers, peft, datasets) are imported inside functions.
"""
