"""Inputs: the dataset, the prompts rendered from it, the model and tokenizer, the checks
before any model loads. Imports only the top-level base
modules (``config``, ``errors``, ``paths``)."""
