"""The shared trainer behind train-tokenizer, train-discrete and train-continuous."""
